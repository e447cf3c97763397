//! The tunnel stream framing as the inbound side reads it: `decode_header` is exactly what `read_header`
//! applies to the bytes of a stream, and `decode_frame::<StreamStatus>` what the outbound side applies to
//! the answer. Input: the raw frame bytes a peer sends (2-byte length prefix, then protobuf).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicmesh_transport::tunnel::{self, MAX_FRAME, StreamStatus};

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.first_chunk::<2>()
        && let Ok(len) = tunnel::frame_len(*prefix)
    {
        assert!(len <= MAX_FRAME);
    }
    if let Ok(h) = tunnel::decode_header(data) {
        // What the decoder promises the inbound side.
        assert!(!h.service.is_empty() && h.service.len() <= tunnel::MAX_SERVICE_NAME);
        assert!((1..=u32::from(u16::MAX)).contains(&h.port));
        assert!(h.request_id.len() <= tunnel::MAX_REQUEST_ID);
        assert!(data.len() <= 2 + MAX_FRAME);
        // Our own encoder's frame of the same header decodes to it again (when it fits: prost may
        // re-encode an out-of-range enum longer than the peer sent it).
        let again = tunnel::encode_frame(&h);
        if again.len() <= 2 + MAX_FRAME {
            assert_eq!(
                tunnel::decode_header(&again).expect("re-encoded header decodes"),
                h
            );
        }
    }
    let _ = tunnel::decode_frame::<StreamStatus>(data);
});
