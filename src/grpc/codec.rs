//! The protobuf codec of the generated services (`build.rs` names it with `codec_path`): prost's,
//! except that a message that cannot be decoded is `INVALID_ARGUMENT`, not tonic-prost's
//! `INTERNAL`. Bytes that are not a well-formed request (truncated, a string that is not UTF-8,
//! an unknown wire type, an over-long varint) are the client's fault, and an `INTERNAL` would
//! send operators looking for a bug of the server.
//!
//! The generated clients (the CLI's, the bench's) use this codec as well: there, an answer that
//! cannot be decoded is also `INVALID_ARGUMENT`, with the same message.
//!
//! A message over `max_message_bytes` never gets here: tonic refuses it by its length prefix,
//! before decoding (see [`super::size_limit`] for the status it answers).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::ProstEncoder;

/// `tonic_prost::ProstCodec`, with decode errors mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec { _pd: PhantomData }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Decoder<U> {
        Decoder { _pd: PhantomData }
    }
}

/// Decodes `U` with prost; malformed bytes are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Decoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("the request could not be decoded: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
