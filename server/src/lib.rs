//! keyward-server (in progress).
