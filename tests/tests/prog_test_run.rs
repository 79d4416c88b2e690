//! BPF_PROG_TEST_RUN: the program judged on crafted packets, without any interface.

use aya::programs::{TestRun, TestRunOptions};
use lb::dataplane::Dataplane;
use lb_common::maps::Reason;
use lb_common::packet::build::Frame;
use lb_tests::privilege::require_root;

const XDP_PASS: u32 = 2;

#[test]
fn packet_for_no_vip_passes_unchanged_and_is_counted() {
    if !require_root("packet_for_no_vip_passes_unchanged_and_is_counted") {
        return;
    }
    let dataplane = Dataplane::load(lb_tests::harness::test_sizes()).unwrap();
    let frame = Frame::udp("192.0.2.1".parse().unwrap(), 5000, "198.51.100.7".parse().unwrap(), 53).bytes();
    let mut out = vec![0u8; frame.len() + 256];
    let before = dataplane.reason_count(Reason::PassNotVip).unwrap();
    let result = dataplane
        .program()
        .unwrap()
        .test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() })
        .unwrap();
    assert_eq!(result.return_value, XDP_PASS);
    assert_eq!(&out[..result.data_size_out as usize], &frame[..], "a passed packet must not be modified");
    assert_eq!(dataplane.reason_count(Reason::PassNotVip).unwrap(), before + 1);
}

/// The verifier's work to accept the program, against the kernel's limit of 1,000,000
/// processed instructions: a new path that multiplies the states to explore shows here long
/// before a kernel refuses the program. A quarter of the limit spare keeps room for other
/// kernels' verifiers, which explore differently.
#[test]
fn the_verifier_accepts_the_program_with_room_to_spare() {
    if !require_root("the_verifier_accepts_the_program_with_room_to_spare") {
        return;
    }
    let dataplane = Dataplane::load(lb_tests::harness::test_sizes()).unwrap();
    let processed = dataplane.verified_instructions().unwrap().expect("the kernel reports verified instructions");
    println!("the verifier processed {processed} instructions (limit 1,000,000)");
    assert!(processed < 750_000, "the verifier processed {processed} instructions: too close to its limit");
}
