//! sender (filled in by the streaming work).
