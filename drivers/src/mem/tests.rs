//! The host controller driver against a controller that stops answering its admin queue and
//! answers late: the in-process controller with its admin hold (a test-only hook) stands in
//! for a slow or hung device.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use fathom_dma::{DmaBuf, DmaPool, PageKind};
use fathom_nvme::spec::{admin_opcode, feature};
use fathom_nvme::{NvmeError, Status, SubmissionEntry};
use fathom_telemetry::Clock;

use super::device::{DeviceShared, MemDevice};
use super::media::Media;
use super::{start_controller, Injector};
use crate::DriverError;

/// Short enough to keep the tests quick, long enough for an answer that is not held back.
const TIMEOUT: Duration = Duration::from_millis(200);
/// What the controller answers to Get Features (Number of Queues) with `max_io_queues` 3:
/// two queues of each kind, 0's based, in NSQA (15:0) and NCQA (31:16).
const THREE_QUEUES: u32 = 2 | 2 << 16;

/// A controller with 1 MiB of ram media and room for three I/O queue pairs, and its DMA pool.
fn controller_device() -> (Arc<MemDevice>, DmaPool) {
    let pool = DmaPool::new(1 << 20, PageKind::Normal).unwrap();
    let clock = Clock::monotonic();
    let shared = Arc::new(DeviceShared {
        media: Media::ram(1 << 20).unwrap(),
        iova: pool.iova_map(),
        block_shift: 9,
        namespace_blocks: 2048,
        injector: Injector::new(&[], &clock),
        runtime: Default::default(),
        clock,
        model: "Fathom mem NVMe".to_string(),
        serial: "FTHM-held".to_string(),
        max_io_queues: 3,
        internal_errors: AtomicU64::new(0),
        deferred_commands: AtomicUsize::new(0),
        held: DeviceShared::queue_flags(3),
    });
    (Arc::new(MemDevice::new(shared)), pool)
}

/// Takes every page the pool can still hand out, filled with `byte`.
fn take_all(pool: &DmaPool, byte: u8) -> Vec<DmaBuf> {
    let mut taken = Vec::new();
    while let Ok(mut buf) = pool.alloc(4096) {
        buf.fill(byte);
        taken.push(buf);
    }
    taken
}

fn get_number_of_queues() -> SubmissionEntry {
    let mut entry = SubmissionEntry::new(admin_opcode::GET_FEATURES, 0, 0);
    entry.cdw10 = feature::NUMBER_OF_QUEUES;
    entry
}

#[test]
fn a_late_admin_completion_does_not_answer_the_next_command() {
    let (device, pool) = controller_device();
    let controller = start_controller("held", &device, &pool, 2, TIMEOUT).unwrap();
    device.hold_admin(Some(admin_opcode::GET_FEATURES));
    let error = controller
        .admin_command("Get Features (Number of Queues)", get_number_of_queues())
        .unwrap_err();
    assert!(matches!(error, NvmeError::Timeout { .. }), "{error}");
    // The controller recovers: it answers the held Get Features first, then the next command,
    // a Set Features of a feature it does not support, which it refuses.
    device.hold_admin(None);
    let mut unsupported = SubmissionEntry::new(admin_opcode::SET_FEATURES, 0, 0);
    unsupported.cdw10 = 0x7f;
    match controller.admin_command("Set Features (0x7f)", unsupported) {
        Err(NvmeError::CommandFailed { status, .. }) => assert_eq!(status, Status::INVALID_FIELD),
        other => panic!("Set Features was answered by another command's completion: {other:?}"),
    }
    assert_eq!(controller.stale_completions(), 1);
    // And the command after that gets its own answer too.
    assert_eq!(
        controller
            .admin_command("Get Features (Number of Queues)", get_number_of_queues())
            .unwrap(),
        THREE_QUEUES
    );
}

#[test]
fn a_timed_out_identify_never_gives_its_buffer_back() {
    let (device, pool) = controller_device();
    device.hold_admin(Some(admin_opcode::IDENTIFY));
    let error = start_controller("held", &device, &pool, 2, TIMEOUT)
        .err()
        .expect("attach cannot finish while Identify is held");
    assert!(
        matches!(error, DriverError::Nvme(NvmeError::Timeout { .. })),
        "{error}"
    );
    // Whatever DMA memory the failed attach gave back is handed out again and filled; then the
    // controller answers the Identify it held, writing its data into the command's buffer and
    // a completion into the admin queue. None of that may land in memory someone now owns.
    let taken = take_all(&pool, 0xa5);
    device.hold_admin(None);
    device.process_admin();
    for buf in &taken {
        assert!(
            buf.to_vec().iter().all(|&byte| byte == 0xa5),
            "the controller wrote into reused DMA memory at {:#x}",
            buf.iova()
        );
    }
}

/// Pages the pool can still hand out.
fn free_pages(pool: &DmaPool) -> usize {
    take_all(pool, 0).len()
}

#[test]
fn a_queue_whose_creation_timed_out_keeps_its_memory_and_its_identifier() {
    let (device, pool) = controller_device();
    let controller = start_controller("held", &device, &pool, 2, TIMEOUT).unwrap();
    let before = free_pages(&pool);
    device.hold_admin(Some(admin_opcode::CREATE_IO_CQ));
    let error = controller.create_io_queue_pair(8).err().unwrap();
    assert!(matches!(error, NvmeError::Timeout { .. }), "{error}");
    // The controller may yet create the completion queue in that memory and write into it.
    let kept = before - free_pages(&pool);
    assert!(
        kept > 0,
        "the rings of a queue that may exist went back to the pool"
    );
    assert_eq!(controller.quarantined_bytes(), kept * 4096);
    // It does: the held Create I/O Completion Queue runs before the next command. That queue
    // identifier is taken now, so the next queue pair must get another one.
    device.hold_admin(None);
    let queue = controller.create_io_queue_pair(8).unwrap();
    assert_ne!(queue.qid(), 1);
    controller.delete_io_queue_pair(queue).unwrap();
}

#[test]
fn a_queue_whose_deletion_failed_keeps_its_memory() {
    let (device, pool) = controller_device();
    let controller = start_controller("held", &device, &pool, 2, TIMEOUT).unwrap();
    let queue = controller.create_io_queue_pair(8).unwrap();
    let with_queue = free_pages(&pool);
    // The submission queue is deleted, the completion queue is not confirmed: the controller
    // may still post into it.
    device.hold_admin(Some(admin_opcode::DELETE_IO_CQ));
    let error = controller.delete_io_queue_pair(queue).unwrap_err();
    assert!(matches!(error, NvmeError::Timeout { .. }), "{error}");
    assert_eq!(
        free_pages(&pool),
        with_queue,
        "the memory of a queue the controller still holds went back to the pool"
    );
    assert!(controller.quarantined_bytes() > 0);
}
