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
    // 3: job history. `jobs.finished` (set while a job is finished) and `jobs.expires` (its
    // ttlSecondsAfterFinished, as a wall-clock time) let finished jobs live on disk only and be
    // pruned there; `job_history` keeps one row of accounting per finished job, which outlives
    // the job's removal until `jobs.history_retention` passes. Existing finished jobs are copied
    // into it, so an upgraded agent's history starts complete.
    "ALTER TABLE jobs ADD COLUMN finished REAL;
     ALTER TABLE jobs ADD COLUMN expires REAL;
     UPDATE jobs SET finished = json_extract(status, '$.finished_at')
      WHERE json_valid(status)
        AND json_extract(status, '$.state') IN ('Succeeded', 'Failed', 'Cancelled');
     CREATE INDEX jobs_finished ON jobs (finished) WHERE finished IS NOT NULL;
     CREATE INDEX jobs_expires ON jobs (expires) WHERE expires IS NOT NULL;
     CREATE TABLE job_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        user TEXT,
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        message TEXT NOT NULL,
        submitted REAL NOT NULL,
        started REAL,
        finished REAL NOT NULL,
        replicas INTEGER NOT NULL,
        gpus INTEGER NOT NULL,
        gpu_seconds REAL NOT NULL,
        restarts INTEGER NOT NULL,
        restart_reasons TEXT NOT NULL,
        exit_codes TEXT NOT NULL,
        UNIQUE (name, submitted)
     );
     CREATE INDEX job_history_finished ON job_history (finished, id);
     CREATE INDEX job_history_user ON job_history (user, finished, id);
     CREATE INDEX job_history_queue ON job_history (queue, finished, id);
     INSERT INTO job_history (name, user, queue, state, reason, message, submitted, started,
        finished, replicas, gpus, gpu_seconds, restarts, restart_reasons, exit_codes)
     SELECT name,
        json_extract(status, '$.owner.user'),
        json_extract(status, '$.queue'),
        json_extract(status, '$.state'),
        json_extract(status, '$.reason'),
        json_extract(status, '$.message'),
        json_extract(status, '$.submitted_at'),
        json_extract(status, '$.started_at'),
        finished,
        json_array_length(status, '$.replicas'),
        (SELECT COALESCE(SUM(json_array_length(r.value, '$.gpu_indices')), 0)
           FROM json_each(status, '$.replicas') AS r),
        (SELECT COALESCE(SUM(json_array_length(r.value, '$.gpu_indices')), 0)
           FROM json_each(status, '$.replicas') AS r)
          * MAX(0.0, finished - COALESCE(json_extract(status, '$.started_at'), finished)),
        json_extract(status, '$.restarts'),
        (SELECT json_group_array(e.reason) FROM
           (SELECT reason FROM events WHERE kind = 'job' AND object = jobs.name
              AND message LIKE '%; restart % of % in %' ORDER BY id) AS e),
        (SELECT json_group_array(json_object(
            'replica', json_extract(r.value, '$.name'),
            'exit_code', json_extract(r.value, '$.exit_code'),
            'signal', json_extract(r.value, '$.signal')))
           FROM json_each(status, '$.replicas') AS r)
     FROM jobs WHERE finished IS NOT NULL;",
    // 4: job templates, and the template (with the values) a finished job was made from.
    "CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        owner_uid INTEGER NOT NULL,
        owner_gid INTEGER NOT NULL,
        owner_user TEXT NOT NULL,
        manifest TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
     );
     CREATE INDEX templates_owner ON templates (owner_user);
     ALTER TABLE job_history ADD COLUMN template TEXT;",
];
