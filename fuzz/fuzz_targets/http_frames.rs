//! The HTTP framing inside a tunnel stream as both proxies read it: a head frame (request or response),
//! then body frames (data, trailers). Input: the raw bytes a peer sends after the stream header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicmesh_transport::l7::frame::{self, Kind, MAX_DATA, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    let Some((prefix, rest)) = data.split_first_chunk::<5>() else {
        return;
    };
    if let Ok((kind, len)) = frame::parse_prefix(*prefix) {
        assert!(len <= if kind == Kind::Data { MAX_DATA } else { MAX_HEAD });
        if kind == Kind::Head && rest.len() >= len {
            let (body, after) = rest.split_at(len);
            if let Ok(head) = frame::decode_head(bytes::Bytes::copy_from_slice(body)) {
                if let Ok(fields) = frame::header_map(&head.headers, "head") {
                    assert!(fields.len() <= frame::MAX_FIELDS);
                }
                let again = frame::encode_head(&head);
                assert_eq!(
                    frame::decode_head(again.freeze().slice(5..)).expect("re-encoded head"),
                    head
                );
            }
            let _ = frame::decode_body(after);
        }
    }
    if let Ok(frames) = frame::decode_body(data) {
        // At most one trailers frame, and only last.
        let trailers = frames
            .iter()
            .position(|f| matches!(f, frame::BodyFrame::Trailers(_)));
        if let Some(i) = trailers {
            assert_eq!(i, frames.len() - 1);
        }
    }
});
