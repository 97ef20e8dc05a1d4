//! Who is calling, and what they may do. Every request has a [`Caller`]: on the Unix socket the
//! peer's credentials (SO_PEERCRED) with the user's name and groups from the system's user
//! database; on the HTTPS listener the user of the bearer token (or client certificate). The
//! rules are the same on every door:
//!
//! - anyone who may connect reads status, nodes, queues, events and the job list;
//! - a user submits jobs, which become theirs, and cancels and reads the logs of their own jobs;
//! - a user saves job templates, which become theirs, and replaces and deletes their own; every
//!   caller lists and reads every template, and a user submits jobs from any of them (a
//!   machine's templates are shared, as its job list is);
//! - root and members of the admin group (`api.admin_group`) act on every job and template, and
//!   alone drain and resume nodes.
//!
//! A refusal is a 403 naming the rule that refused it.
//!
//! A remote caller's replicas run as a local account like everyone's: the token's (or
//! certificate's) user must be a user of this machine to submit; one who is not may still read
//! what every caller reads.

use agentd_api::Owner;

use super::ApiError;

/// The default `api.admin_group`.
pub const DEFAULT_ADMIN_GROUP: &str = "agentd-admin";

/// The identity a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user, as recorded on the jobs they submit.
    pub owner: Owner,
    /// Whether the caller may act on every job (root, or a member of the admin group).
    pub admin: bool,
}

/// The uid and gid recorded for a remote user with no account here; nothing runs as them.
pub const NO_ACCOUNT: u32 = u32::MAX;

impl Caller {
    /// The caller behind a Unix socket peer: its uid and gid, with the user's name and group
    /// memberships looked up in the system's user database.
    pub fn from_peer(uid: u32, gid: u32, admin_group: &str) -> Self {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let name = user
            .as_ref()
            .map_or_else(|| uid.to_string(), |u| u.name.clone());
        let admin = uid == 0
            || user
                .as_ref()
                .is_some_and(|u| is_member(&u.name, gid, admin_group));
        Self {
            owner: Owner {
                uid,
                gid,
                user: name,
            },
            admin,
        }
    }

    /// The caller behind a remote credential naming `user` with `groups` (a token's; none for
    /// a client certificate). The local account of that name gives the uid and gid; the admin
    /// rule is the socket's (root, or a member of the admin group here), and a token may also
    /// carry the admin group itself.
    pub fn from_remote(user: &str, groups: &[String], admin_group: &str) -> Self {
        let account = nix::unistd::User::from_name(user).ok().flatten();
        let in_admin_group = groups.iter().any(|g| g == admin_group);
        match account {
            Some(account) => {
                let (uid, gid) = (account.uid.as_raw(), account.gid.as_raw());
                Self {
                    owner: Owner {
                        uid,
                        gid,
                        user: account.name.clone(),
                    },
                    admin: uid == 0 || in_admin_group || is_member(&account.name, gid, admin_group),
                }
            }
            None => Self {
                owner: Owner {
                    uid: NO_ACCOUNT,
                    gid: NO_ACCOUNT,
                    user: user.to_owned(),
                },
                admin: in_admin_group,
            },
        }
    }

    /// Whether the caller is an account of this machine (always, on the socket): replicas run
    /// as their submitter, so only such a caller may submit.
    pub fn local_account(&self) -> bool {
        self.owner.uid != NO_ACCOUNT
    }

    /// May this caller submit a job? Its replicas run as the caller, who must be a user here.
    pub fn may_submit(&self) -> Result<(), ApiError> {
        if self.local_account() {
            return Ok(());
        }
        Err(ApiError::Forbidden {
            rule: "local-account",
            message: format!(
                "{} has no account on this machine, and replicas run as the user who submits \
                 them; create the user here (useradd {}) or give the token to an existing user",
                self.owner.user, self.owner.user
            ),
        })
    }

    /// The user name, for logs and events.
    pub fn name(&self) -> &str {
        &self.owner.user
    }

    /// May this caller act on a job owned by `owner` (cancel it, read its logs)?
    pub fn may_act_on(&self, job: &str, owner: Option<&Owner>) -> Result<(), ApiError> {
        if self.admin || owner.is_some_and(|o| self.owns(o)) {
            return Ok(());
        }
        Err(ApiError::Forbidden {
            rule: "own-jobs",
            message: format!(
                "{} may only act on their own jobs; job {job:?} belongs to {}; \
                 root and members of the admin group act on every job",
                self.owner.user,
                owner.map_or("nobody (it predates job owners)", |o| o.user.as_str()),
            ),
        })
    }

    /// May this caller replace or delete a template owned by `owner`?
    pub fn may_change_template(&self, owner: &Owner) -> bool {
        self.admin || self.owns(owner)
    }

    /// The refusal of a change to template `name`, owned by `owner`, by this caller.
    pub fn not_template_owner(&self, name: &str, owner: &Owner) -> ApiError {
        ApiError::Forbidden {
            rule: "own-templates",
            message: format!(
                "{} may only replace or delete their own templates; template {name:?} belongs \
                 to {}; save yours under another name, or ask them or an admin",
                self.owner.user, owner.user
            ),
        }
    }

    /// May this caller make a job from template `name`, owned by `owner`? Anyone may, but
    /// root only from templates root owns: a job of root's runs as root, and may run as
    /// anyone, so what it runs must not be another user's to change.
    pub fn may_run_template(&self, name: &str, owner: &Owner) -> Result<(), ApiError> {
        if self.owner.uid != 0 || owner.uid == 0 {
            return Ok(());
        }
        Err(ApiError::Forbidden {
            rule: "root-runs-root-templates",
            message: format!(
                "root makes jobs only from templates root owns: template {name:?} belongs to \
                 {}, who can change what it runs at any time; save a copy as root \
                 (agentctl template show {name} > FILE; agentctl template save NEW FILE)",
                owner.user
            ),
        })
    }

    /// May this caller drain or resume a node? That decides for everyone's jobs, so only root
    /// and the admin group may.
    pub fn may_manage_nodes(&self, node: &str) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        Err(ApiError::Forbidden {
            rule: "admin-nodes",
            message: format!(
                "{} may not drain or resume node {node:?}: only root and members of the admin \
                 group (api.admin_group) may",
                self.owner.user
            ),
        })
    }

    fn owns(&self, owner: &Owner) -> bool {
        // A remote token names a user; a socket peer is a uid. Both are recorded, so the uid
        // decides where the system knows the user, the name where it does not.
        owner.uid == self.owner.uid && owner.user == self.owner.user
    }
}

/// Whether `user` (primary group `gid`) is in `group`, counting supplementary groups.
fn is_member(user: &str, gid: u32, group: &str) -> bool {
    let Ok(Some(group)) = nix::unistd::Group::from_name(group) else {
        return false;
    };
    if group.gid.as_raw() == gid || group.mem.iter().any(|m| m == user) {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .is_ok_and(|groups| groups.contains(&group.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, user: &str, admin: bool) -> Caller {
        Caller {
            owner: Owner {
                uid,
                gid: uid,
                user: user.to_owned(),
            },
            admin,
        }
    }

    #[test]
    fn a_remote_user_is_the_local_account_of_that_name() {
        let root = Caller::from_remote("root", &[], DEFAULT_ADMIN_GROUP);
        assert_eq!(
            (root.owner.uid, root.admin, root.local_account()),
            (0, true, true)
        );
        assert!(root.may_submit().is_ok());

        let ghost = Caller::from_remote("agentd-no-such-user", &[], DEFAULT_ADMIN_GROUP);
        assert!(!ghost.admin && !ghost.local_account());
        assert_eq!(ghost.owner.uid, NO_ACCOUNT);
        let err = ghost.may_submit().unwrap_err();
        assert!(
            matches!(
                err,
                ApiError::Forbidden {
                    rule: "local-account",
                    ..
                }
            ) && err.to_string().contains("agentd-no-such-user"),
            "{err}"
        );
        let admin = Caller::from_remote(
            "agentd-no-such-user",
            &["ml".to_owned(), DEFAULT_ADMIN_GROUP.to_owned()],
            DEFAULT_ADMIN_GROUP,
        );
        assert!(admin.admin, "the admin group on the token makes an admin");
    }

    #[test]
    fn root_is_admin_and_named() {
        let root = Caller::from_peer(0, 0, DEFAULT_ADMIN_GROUP);
        assert!(root.admin);
        assert_eq!(root.name(), "root");
    }

    #[test]
    fn unknown_uid_is_named_by_number_and_not_admin() {
        let ghost = Caller::from_peer(4_000_123, 4_000_123, DEFAULT_ADMIN_GROUP);
        assert!(!ghost.admin);
        assert_eq!(ghost.name(), "4000123");
    }

    #[test]
    fn only_admins_drain_and_resume_nodes() {
        assert!(caller(0, "root", true).may_manage_nodes("gpu-1").is_ok());
        let refused = caller(1001, "alice", false)
            .may_manage_nodes("gpu-1")
            .unwrap_err();
        assert!(
            matches!(
                refused,
                ApiError::Forbidden {
                    rule: "admin-nodes",
                    ..
                }
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn own_jobs_only_unless_admin() {
        let alice = caller(1001, "alice", false);
        let bob = caller(1002, "bob", false);
        let admin = caller(1003, "carol", true);
        assert!(alice.may_act_on("a", Some(&alice.owner)).is_ok());
        let err = bob.may_act_on("a", Some(&alice.owner)).unwrap_err();
        assert!(
            matches!(
                err,
                ApiError::Forbidden {
                    rule: "own-jobs",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("belongs to alice"), "{err}");
        assert!(admin.may_act_on("a", Some(&alice.owner)).is_ok());
        assert!(bob.may_act_on("old", None).is_err());
        assert!(admin.may_act_on("old", None).is_ok());
    }
}
