//! The Kafka session (shared by the proxy and the wasm filter) never panics on any sequence of
//! client frames and broker answers, and what it sends either way is well framed: a forwarded
//! request decodes, a local answer's length prefix matches its body. The input is a sequence of
//! chunks `[tag][len: u16 BE][bytes]`: even tags are request frames (without prefix), odd tags the
//! broker's next answer (without prefix) for the oldest request owed one.
#![no_main]

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use membrane_codec::kafka::session::{Judged, KafkaJudge, KafkaSession, Owed, ToBroker};
use membrane_codec::kafka::{LENGTH_PREFIX, decode_request, frame_len};
use membrane_policy::l7::kafka::KafkaRequest;

/// Allows requests whose topics all have even-length names; refuses the connection on tag 254.
struct EvenTopics(bool);

impl KafkaJudge for EvenTopics {
    fn refuses_connection(&self) -> Option<(&'static str, String)> {
        self.0.then(|| ("ingress", "refused".to_string()))
    }

    fn judge(&self, facts: &KafkaRequest<'_>) -> Judged {
        match facts.topics {
            Some(t) if t.iter().all(|t| t.len() % 2 == 0) => Judged::Allow {
                direction: "ingress",
                policy: "p".into(),
            },
            _ => Judged::Deny {
                direction: "ingress",
                denied_topics: Vec::new(),
            },
        }
    }
}

fn prefixed(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(LENGTH_PREFIX + body.len());
    out.put_i32(body.len() as i32);
    out.extend_from_slice(body);
    out.freeze()
}

fuzz_target!(|input: &[u8]| {
    let mut session = KafkaSession::default();
    let mut owed = VecDeque::new();
    let mut rest = input;
    while let [tag, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        let judge = EvenTopics(*tag == 254);
        if tag % 2 == 0 {
            let settled = session.settle(prefixed(chunk), &judge);
            match settled.to_broker {
                ToBroker::Frame(frame) => {
                    assert_eq!(
                        frame_len(&frame, usize::MAX).unwrap(),
                        Some(frame.len() - 4)
                    );
                    decode_request(frame.slice(LENGTH_PREFIX..))
                        .expect("a forwarded request decodes");
                }
                ToBroker::Close => return,
                ToBroker::Nothing => {}
            }
            if let Some(o) = settled.owed {
                if let Owed::Local(answer) = &o {
                    assert_eq!(
                        frame_len(answer, usize::MAX).unwrap(),
                        Some(answer.len() - 4)
                    );
                }
                owed.push_back(o);
            }
        } else {
            match owed.pop_front() {
                Some(Owed::Broker(expect)) if expect.rewrites() => {
                    if let Ok(frame) =
                        session.rewrite(expect, Bytes::copy_from_slice(chunk), &judge)
                    {
                        assert_eq!(
                            frame_len(&frame, usize::MAX).unwrap(),
                            Some(frame.len() - 4)
                        );
                    }
                }
                Some(Owed::Broker(expect)) => {
                    let _ = session.pass_head(expect, &chunk[..chunk.len().min(32)]);
                }
                Some(Owed::Local(_)) | None => {}
            }
        }
    }
});
