//! Schema migrations, applied in order; the database's `user_version` is how many have run.
//! Never edit a migration that has shipped: add a new one.

pub const ALL: &[&str] = &[
    // 1: events, inventory samples, settings.
    "CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        object TEXT NOT NULL,
        reason TEXT NOT NULL,
        message TEXT NOT NULL
     );
     CREATE INDEX events_object ON events (kind, object, id);
     CREATE TABLE inventory_samples (time REAL NOT NULL, sample TEXT NOT NULL);
     CREATE INDEX inventory_samples_time ON inventory_samples (time);
     CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 2: jobs: the manifest as submitted, and the status the agent keeps.
    "CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        status TEXT NOT NULL,
        updated REAL NOT NULL
     );",
];
