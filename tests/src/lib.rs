//! keyward-tests (in progress).
