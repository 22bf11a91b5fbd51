//! Per-node call limits and endpoint coalescing for enrolled nodes. Pure: no
//! I/O, no clock; `now` is an argument.
//!
//! STUB

use std::collections::HashMap;

use crate::UnixMs;

/// The node calls that are limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    ReportEndpoints,
    ReportFlows,
    StreamOpen,
}

impl Call {
    /// The gRPC method name, as the refusal message shows it.
    pub fn name(self) -> &'static str {
        match self {
            Call::ReportEndpoints => "ReportEndpoints",
            Call::ReportFlows => "ReportFlows",
            Call::StreamOpen => "StreamNetMap",
        }
    }
}

/// STUB
#[derive(Debug, Default)]
pub struct NodeLimiter {
    _b: HashMap<(u64, Call), UnixMs>,
}

impl NodeLimiter {
    /// STUB
    pub fn check(&mut self, _node: u64, _call: Call, _now: UnixMs) -> Result<(), String> {
        Ok(())
    }
}
