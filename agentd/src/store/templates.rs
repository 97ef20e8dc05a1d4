//! Job templates on disk (`templates`, migration 4): saved manifests that jobs are made from.
//! This module keeps them and their owners and enforces the bounds; checking that a manifest
//! could run is the caller's (`job::template`), and who may act on whose template is decided by
//! the caller's `may_change` check.
//!
//! [`Templates`] has a database connection of its own, as [`super::History`] does, so that the
//! API's reads and writes run on a blocking thread and never on the core's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agentd_api::Owner;
use agentd_api::templates::{Template, TemplateSummary};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::StoreError;

/// The most templates one user may keep: enough for every configuration a team launches again,
/// few enough that one user cannot fill the disk with them.
pub const MAX_TEMPLATES_PER_USER: u32 = 100;

/// The most templates the agent keeps in all (every user together).
pub const MAX_TEMPLATES: u32 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no template named {0:?}")]
    NotFound(String),
    #[error("template {name:?} belongs to {}", owner.user)]
    NotOwner { name: String, owner: Owner },
    #[error(
        "{user} already keeps {limit} templates, the most one user may; delete one \
         (agentctl template delete NAME) before saving another"
    )]
    TooManyForUser { user: String, limit: u32 },
    #[error(
        "the agent already keeps {limit} templates, the most it keeps in all; delete some \
         before saving another"
    )]
    TooMany { limit: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Created,
    Replaced,
}

/// The templates table, on a connection of its own.
#[derive(Clone)]
pub struct Templates {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Templates {
    /// Opens a second connection to the database at `path` (already migrated by
    /// [`super::Store`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(open)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Saves `manifest` as template `name` for `owner`. A template of that name is replaced only
    /// if `may_change` allows it for its owner, who stays its owner; a new one counts against
    /// the bounds.
    pub fn save(
        &self,
        name: &str,
        manifest: &str,
        owner: &Owner,
        now: f64,
        may_change: impl FnOnce(&Owner) -> bool,
    ) -> Result<Saved, TemplateError> {
        let mut conn = self.lock();
        // Immediate: it reads, then writes. A deferred transaction that must turn from reading
        // to writing after the agent's core wrote meanwhile fails at once with "database is
        // locked", whatever the busy timeout; taking the write lock first waits for it instead.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        let existing = tx
            .query_row(
                "SELECT owner_uid, owner_gid, owner_user FROM templates WHERE name = ?1",
                params![name],
                owner_of,
            )
            .optional()
            .map_err(self.sql())?;
        let saved = if let Some(current) = existing {
            if !may_change(&current) {
                return Err(TemplateError::NotOwner {
                    name: name.to_owned(),
                    owner: current,
                });
            }
            tx.execute(
                "UPDATE templates SET manifest = ?2, updated = ?3 WHERE name = ?1",
                params![name, manifest, now],
            )
            .map_err(self.sql())?;
            Saved::Replaced
        } else {
            let (mine, all): (u32, u32) = tx
                .query_row(
                    "SELECT COALESCE(SUM(owner_user = ?1), 0), COUNT(*) FROM templates",
                    params![owner.user],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(self.sql())?;
            if mine >= MAX_TEMPLATES_PER_USER {
                return Err(TemplateError::TooManyForUser {
                    user: owner.user.clone(),
                    limit: MAX_TEMPLATES_PER_USER,
                });
            }
            if all >= MAX_TEMPLATES {
                return Err(TemplateError::TooMany {
                    limit: MAX_TEMPLATES,
                });
            }
            tx.execute(
                "INSERT INTO templates
                    (name, owner_uid, owner_gid, owner_user, manifest, created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![name, owner.uid, owner.gid, owner.user, manifest, now],
            )
            .map_err(self.sql())?;
            Saved::Created
        };
        tx.commit().map_err(self.sql())?;
        Ok(saved)
    }

    /// One template, as saved.
    pub fn get(&self, name: &str) -> Result<Template, TemplateError> {
        let conn = self.lock();
        conn.prepare_cached(
            "SELECT name, owner_uid, owner_gid, owner_user, created, updated, manifest
             FROM templates WHERE name = ?1",
        )
        .map_err(self.sql())?
        .query_row(params![name], |r| {
            Ok(Template {
                name: r.get(0)?,
                owner: Owner {
                    uid: r.get(1)?,
                    gid: r.get(2)?,
                    user: r.get(3)?,
                },
                created_at: r.get(4)?,
                updated_at: r.get(5)?,
                manifest: r.get(6)?,
            })
        })
        .optional()
        .map_err(self.sql())?
        .ok_or_else(|| TemplateError::NotFound(name.to_owned()))
    }

    /// Every template, by name, without their manifests.
    pub fn list(&self) -> Result<Vec<TemplateSummary>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, owner_uid, owner_gid, owner_user, created, updated,
                        length(CAST(manifest AS BLOB))
                 FROM templates ORDER BY name",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(TemplateSummary {
                    name: r.get(0)?,
                    owner: Owner {
                        uid: r.get(1)?,
                        gid: r.get(2)?,
                        user: r.get(3)?,
                    },
                    created_at: r.get(4)?,
                    updated_at: r.get(5)?,
                    bytes: r.get(6)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Deletes template `name` if `may_change` allows it for its owner; returns it as it was.
    pub fn delete(
        &self,
        name: &str,
        may_change: impl FnOnce(&Owner) -> bool,
    ) -> Result<Template, TemplateError> {
        let template = self.get(name)?;
        if !may_change(&template.owner) {
            return Err(TemplateError::NotOwner {
                name: name.to_owned(),
                owner: template.owner,
            });
        }
        // The owner is in the condition: a template replaced by another of the same name by
        // someone else in between is not deleted on the first one's say.
        let deleted = self
            .lock()
            .execute(
                "DELETE FROM templates WHERE name = ?1 AND owner_user = ?2 AND owner_uid = ?3",
                params![name, template.owner.user, template.owner.uid],
            )
            .map_err(self.sql())?;
        if deleted == 0 {
            return Err(TemplateError::NotFound(name.to_owned()));
        }
        Ok(template)
    }
}

fn owner_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Owner> {
    Ok(Owner {
        uid: r.get(0)?,
        gid: r.get(1)?,
        user: r.get(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn owner(user: &str, uid: u32) -> Owner {
        Owner {
            uid,
            gid: uid,
            user: user.to_owned(),
        }
    }

    fn open() -> (tempfile::TempDir, Store, Templates) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let templates = Templates::open(store.path()).unwrap();
        (dir, store, templates)
    }

    #[test]
    fn templates_are_saved_listed_shown_and_deleted() {
        let (_dir, _store, templates) = open();
        let alice = owner("alice", 1000);
        let saved = templates
            .save("mnist", "kind: TrainingJob\n", &alice, 10.0, |_| false)
            .unwrap();
        assert_eq!(saved, Saved::Created);
        templates
            .save("bert", "{\"kind\":\"TFJob\"}", &alice, 11.0, |_| false)
            .unwrap();
        let list = templates.list().unwrap();
        let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["bert", "mnist"]);
        assert_eq!(list[1].bytes, 18);
        assert_eq!(list[1].owner, alice);

        let shown = templates.get("mnist").unwrap();
        assert_eq!(shown.manifest, "kind: TrainingJob\n");
        assert_eq!((shown.created_at, shown.updated_at), (10.0, 10.0));

        let deleted = templates.delete("mnist", |o| o.user == "alice").unwrap();
        assert_eq!(deleted.name, "mnist");
        assert!(matches!(
            templates.get("mnist"),
            Err(TemplateError::NotFound(_))
        ));
        assert!(matches!(
            templates.delete("mnist", |_| true),
            Err(TemplateError::NotFound(_))
        ));
    }

    #[test]
    fn only_whom_the_check_allows_replaces_or_deletes_a_template() {
        let (_dir, _store, templates) = open();
        let alice = owner("alice", 1000);
        let bob = owner("bob", 1001);
        templates
            .save("mnist", "v1", &alice, 1.0, |_| false)
            .unwrap();

        // Bob's check says he may act on his own only: the template stays Alice's, unchanged.
        let is_bob = |o: &Owner| o.uid == 1001;
        let err = templates
            .save("mnist", "v2", &bob, 2.0, is_bob)
            .unwrap_err();
        assert!(
            matches!(&err, TemplateError::NotOwner { owner, .. } if owner.user == "alice"),
            "{err}"
        );
        assert!(matches!(
            templates.delete("mnist", is_bob),
            Err(TemplateError::NotOwner { .. })
        ));
        assert_eq!(templates.get("mnist").unwrap().manifest, "v1");

        // An admin's check allows all: the manifest is replaced, the owner stays Alice.
        let saved = templates.save("mnist", "v2", &bob, 3.0, |_| true).unwrap();
        assert_eq!(saved, Saved::Replaced);
        let shown = templates.get("mnist").unwrap();
        assert_eq!(
            (shown.manifest.as_str(), shown.owner.user.as_str()),
            ("v2", "alice")
        );
        assert_eq!((shown.created_at, shown.updated_at), (1.0, 3.0));
    }

    #[test]
    fn a_user_keeps_a_bounded_number_of_templates() {
        let (_dir, _store, templates) = open();
        let alice = owner("alice", 1000);
        for i in 0..MAX_TEMPLATES_PER_USER {
            templates
                .save(&format!("t-{i}"), "m", &alice, 1.0, |_| false)
                .unwrap();
        }
        let err = templates
            .save("one-more", "m", &alice, 1.0, |_| false)
            .unwrap_err();
        assert!(matches!(err, TemplateError::TooManyForUser { .. }), "{err}");
        assert!(
            err.to_string().contains("agentctl template delete"),
            "{err}"
        );
        // Replacing one of them is not a new one; another user still has room.
        templates.save("t-0", "m2", &alice, 2.0, |_| true).unwrap();
        templates
            .save("bobs", "m", &owner("bob", 1001), 1.0, |_| false)
            .unwrap();
    }

    #[test]
    fn templates_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let templates = Templates::open(store.path()).unwrap();
            templates
                .save("mnist", "m", &owner("alice", 1000), 1.0, |_| false)
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let templates = Templates::open(store.path()).unwrap();
        assert_eq!(templates.get("mnist").unwrap().owner.user, "alice");
    }
}
