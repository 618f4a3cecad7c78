//! membrane's xDS server.
//!
//! Built so far: [`translate`], the pure translation from resolved policy to the resources the
//! server will serve (`membrane.v1.NetworkPolicy` per endpoint, `membrane.v1.NetworkPolicyHosts`
//! per identity, the SPIFFE ID table), golden-tested. Not built yet: the tonic ADS service
//! (streams, versions, nonces, ACK/NACK, "policy realized" completions), see issue 6.

pub mod translate;
