//! ztmesh controller.
