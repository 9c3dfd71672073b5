//! What the server answers to bytes that are not a request it can decode: malformed protobuf is
//! the client's fault (`INVALID_ARGUMENT`), and a message over `max_message_bytes` is
//! `RESOURCE_EXHAUSTED`, as gRPC clients expect. The requests are sent as raw bytes over HTTP/2
//! to a real server, so nothing on the client side validates them first.

mod common;

use bytes::{Buf, BufMut};
use common::{Backend, D, TestServer, ts};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use waquota::proto::{AcquireRequest, AcquireResponse, Decision};

/// Sends and receives message bodies as they are, with no protobuf on the client side.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// One unary call of `path` with `body` as the message bytes.
async fn call(
    channel: &Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

const ACQUIRE: &str = "/waquota.v1.QuotaService/Acquire";
const PUT_POLICY: &str = "/waquota.v1.AdminService/PutPolicy";

async fn channel(srv: &TestServer) -> Channel {
    common::connect(&srv.endpoint()).await
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument_and_the_next_request_is_served() {
    let srv = TestServer::start(Backend::Memory).await;
    let ch = channel(&srv).await;

    let malformed: [(&str, Vec<u8>); 5] = [
        // sender (field 1, length-delimited) holding bytes that are not UTF-8
        ("invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        // sender announced with 5 bytes, 1 sent
        ("truncated", vec![0x0a, 0x05, b'a']),
        // field 1 with wire type 7, which does not exist
        ("wire type 7", vec![0x0f, 0x00]),
        // kind (field 3, varint) with 11 continuation bytes: longer than any varint
        (
            "over-long varint",
            [vec![0x18], vec![0xff; 11], vec![0x01]].concat(),
        ),
        // a field number of 0
        ("field 0", vec![0x00, 0x00]),
    ];
    for (what, body) in malformed {
        let status = call(&ch, ACQUIRE, body)
            .await
            .expect_err(&format!("{what}: must be refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains("could not be decoded"),
            "{what}: {:?}",
            status.message()
        );
    }
    let status = call(&ch, PUT_POLICY, vec![0x12, 0x05, 0x08])
        .await
        .expect_err("truncated policy");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The same connection still serves well-formed requests, raw and through the client.
    let good = AcquireRequest {
        sender: "s1".into(),
        recipient: "r1".into(),
        at: Some(ts(D)),
        ..Default::default()
    };
    let answer = call(&ch, ACQUIRE, good.encode_to_vec())
        .await
        .expect("a well-formed request is served");
    let answer = AcquireResponse::decode(answer.as_slice()).expect("an AcquireResponse");
    assert_eq!(answer.decision(), Decision::AllowedNew);
    let again = srv
        .quota()
        .await
        .acquire(good)
        .await
        .expect("the generated client still works")
        .into_inner();
    assert_eq!(again.decision(), Decision::AllowedCounted);
}

#[tokio::test]
async fn a_message_over_max_message_bytes_is_resource_exhausted() {
    let srv = TestServer::start_with(Backend::Memory, |s| s.max_message_bytes = 1024).await;
    let ch = channel(&srv).await;
    let big = AcquireRequest {
        sender: "s1".into(),
        recipient: "r".repeat(2000),
        ..Default::default()
    };
    let status = call(&ch, ACQUIRE, big.encode_to_vec())
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{:?}",
        status.message()
    );
    // Over the limit is told apart from malformed: the size is checked before decoding.
    let status = call(&ch, ACQUIRE, vec![0x0f; 2000])
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}
