//! ztmesh node.
