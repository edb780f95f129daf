//! The caller of an RPC, as the access rules ([`crate::access`]) see it:
//! the token of its `authorization: Bearer` metadata, or the SANs of its
//! verified client certificate. The caller's name is recorded in the RPC's
//! span.

use tonic::{Request, Status};

use crate::access::{Access, Identity, Presented, bearer_token};
use crate::oci::Repository;
use crate::tls::certificate_identities;

/// Who sent `request`; UNAUTHENTICATED when callers are configured and it
/// names none of them.
pub fn identify<'a, T>(access: &'a Access, request: &Request<T>) -> Result<Identity<'a>, Status> {
    let bearer = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    // The leaf certificate is parsed only when no token was sent.
    let sans = match bearer {
        Some(_) => Vec::new(),
        None => request
            .peer_certs()
            .and_then(|chain| chain.first().map(certificate_identities))
            .unwrap_or_default(),
    };
    let identity = access.identify(Presented {
        bearer,
        certificate_sans: &sans,
    })?;
    if let Some(name) = identity.name() {
        tracing::Span::current().record("caller", name);
    }
    Ok(identity)
}

/// A checked request that names the repository it reads.
pub trait Scoped {
    /// The repository.
    fn repository(&self) -> &Repository;
}
