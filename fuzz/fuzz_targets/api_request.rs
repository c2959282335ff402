//! An API request as a client sends it: the head is parsed with the
//! server's limits, the route found, the body decoded into an action.
//! Nothing a client sends may panic; a parsed head must respect the limits.
#![no_main]

use keel_api::http::{MAX_BODY_LEN, MAX_HEAD_LEN, parse_request_head};
use keel_api::request::decode;
use keel_api::vmm_api::Endpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((head, start))) = parse_request_head(data) else {
        return;
    };
    assert!(start <= MAX_HEAD_LEN && start <= data.len());
    assert!(head.content_length <= MAX_BODY_LEN);
    let body = &data[start..data.len().min(start + head.content_length)];
    if let Ok(endpoint) = Endpoint::route(&head.method, &head.path) {
        match decode(endpoint, body, Vec::new()) {
            Ok(_) => {}
            Err(response) => assert!((400..600).contains(&response.status)),
        }
    }
});
