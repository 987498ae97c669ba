//! Dirty trackers (filled in by the tracker work).
