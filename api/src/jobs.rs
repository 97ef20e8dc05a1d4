//! Jobs on the wire (filled in by the jobs work).
