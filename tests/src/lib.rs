//! Harness for ztmesh end-to-end tests.
