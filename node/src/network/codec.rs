//! The request-response codec, shared with the coordinator: see
//! `barnraise_mesh::codec`.

pub use barnraise_mesh::codec::{
    BlobCodec, Codec, CoordinatorCodec, Framed, read_framed, write_framed,
};
