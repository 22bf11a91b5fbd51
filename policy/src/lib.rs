//! ztmesh policy engine (pure: no I/O). Work in progress.
