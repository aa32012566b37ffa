//! keyward-agent (in progress).
