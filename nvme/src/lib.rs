//! NVMe: the wire structures, the host queue pair and the host controller driver, shared by
//! every transport.

pub mod controller;
pub mod doorbell;
pub mod qpair;
pub mod spec;

pub use controller::{
    ControllerIdentity, Namespace, NvmeController, NvmeError, OwnedQueuePair, Transport,
};
pub use doorbell::{Doorbell, DoorbellKind, DoorbellPage};
pub use qpair::{Completed, DataRange, QueueFull, QueueMemory, QueuePair, MAX_TRANSFER_BYTES};
pub use spec::{CompletionEntry, Status, SubmissionEntry};
