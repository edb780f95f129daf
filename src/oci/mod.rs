//! OCI domain types, validated at construction: repository names, tags,
//! digests (with an incremental verifier), media types, platforms, and the
//! little manifest inspection the service needs (kind, media type, index
//! entries for platform resolution). Nothing here does I/O.

mod digest;
mod error;
pub mod manifest;
mod media_type;
mod platform;
mod reference;
mod repository;

pub use digest::{Algorithm, Digest, Verifier};
pub use error::ParseError;
pub use media_type::MediaType;
pub use platform::{Platform, PlatformField};
pub use reference::{Reference, Tag};
pub use repository::Repository;
