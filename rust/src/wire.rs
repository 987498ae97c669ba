//! wire (filled in by the streaming work).
