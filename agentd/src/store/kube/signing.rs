//! Who submitted a job, vouched for by the agents. The agent that takes a submission records
//! the submitter in [`OWNER_ANNOTATION`](super::OWNER_ANNOTATION); anyone else who may create
//! `TrainingJob`s could write that annotation too, naming any user. So the agent also signs it
//! ([`SIGNATURE_ANNOTATION`]: an HMAC-SHA256 over the namespace, the name, the owner and the
//! job's spec as agentd reads it) with a key held in the Secret [`KEY_SECRET`], which only
//! agentd's ServiceAccounts may read; the leader makes it, at random, when there is none. An
//! owner whose signature does not verify is not believed: the job is the Kubernetes client's
//! that created it (`kubernetes:<field manager>`), as one applied with `kubectl` is.
//!
//! The signature binds the owner to this object's spec, so it cannot be moved onto another job;
//! copied onto a new object of the same namespace, name and spec, it makes the job its owner
//! submitted once before.

use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, PostParams};
use ring::hmac;
use serde_json::json;

use super::{DEFAULT_NAMESPACE, manifest_of};
use crate::job;

/// The signature of the submitter of a job, in lowercase hex.
pub const SIGNATURE_ANNOTATION: &str = "agentd.io/owner-signature";

/// The Secret, in the agents' namespace, that holds the key (`data.key`, 32 random bytes).
pub const KEY_SECRET: &str = "agentd-submitters";

/// The key agents sign submitters with.
#[derive(Clone)]
pub struct SubmitterKey(Arc<hmac::Key>);

impl std::fmt::Debug for SubmitterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubmitterKey(..)")
    }
}

impl SubmitterKey {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// The signature of `owner` (the annotation's text) as the submitter of `object`, or
    /// `None` if the object holds no job agentd can read.
    pub fn sign(&self, object: &DynamicObject, owner: &str) -> Option<String> {
        let text = signed_text(object, owner)?;
        let tag = hmac::sign(&self.0, text.as_bytes());
        Some(tag.as_ref().iter().fold(String::new(), |mut hex, b| {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
            hex
        }))
    }

    /// Whether `signature` is this key's signature of `owner` as the submitter of `object`.
    pub fn verify(&self, object: &DynamicObject, owner: &str, signature: &str) -> bool {
        let Some(text) = signed_text(object, owner) else {
            return false;
        };
        let Some(tag) = from_hex(signature) else {
            return false;
        };
        hmac::verify(&self.0, text.as_bytes(), &tag).is_ok()
    }
}

/// What is signed: the object's place, the owner as recorded, and the spec as agentd reads it
/// (so that how the API server stores it, field order or defaults, does not matter).
fn signed_text(object: &DynamicObject, owner: &str) -> Option<String> {
    let name = object.metadata.name.as_deref()?;
    let namespace = object
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let job = job::parse(manifest_of(object).as_bytes()).ok()?;
    let spec = job::to_manifest(&job)["spec"].to_string();
    Some(format!(
        "agentd.io/owner v1\n{namespace}\n{name}\n{owner}\n{spec}"
    ))
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The key, read once from its Secret (and made there by the leader when there is none).
pub struct SubmitterKeys {
    client: kube::Client,
    namespace: String,
    key: Mutex<Option<SubmitterKey>>,
}

impl SubmitterKeys {
    pub fn new(client: kube::Client, namespace: String) -> Arc<Self> {
        Arc::new(Self {
            client,
            namespace,
            key: Mutex::new(None),
        })
    }

    /// The key once it was read.
    pub fn cached(&self) -> Option<SubmitterKey> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SubmitterKey>> {
        // An optional key is whole even if a holder panicked.
        self.key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key: read from the Secret, or, when `make` (the leader) and there is none, made.
    /// `Ok(None)`: there is none yet and this agent may not make it.
    pub async fn load(&self, make: bool) -> Result<Option<SubmitterKey>, String> {
        if let Some(key) = self.cached() {
            return Ok(Some(key));
        }
        let at = format!("{}/{KEY_SECRET}", self.namespace);
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let read = |secret: Secret| -> Result<SubmitterKey, String> {
            match secret.data.as_ref().and_then(|d| d.get("key")) {
                Some(key) if key.0.len() >= 32 => Ok(SubmitterKey::from_bytes(&key.0)),
                _ => Err(format!(
                    "Secret {at} has no data.key of at least 32 bytes: delete it and the \
                     leader makes a new one"
                )),
            }
        };
        let found = api
            .get_opt(KEY_SECRET)
            .await
            .map_err(|e| format!("reading Secret {at}: {}", crate::cluster::error_chain(&e)))?;
        let key = match found {
            Some(secret) => read(secret)?,
            None if !make => return Ok(None),
            None => {
                let bytes: [u8; 32] = rand::random();
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": {"name": KEY_SECRET, "namespace": self.namespace},
                    "type": "Opaque",
                }))
                .map_err(|e| e.to_string())?;
                let secret = Secret {
                    data: Some([("key".to_owned(), ByteString(bytes.to_vec()))].into()),
                    ..secret
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => SubmitterKey::from_bytes(&bytes),
                    // Another leader made it first: its key is the one.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        read(api.get(KEY_SECRET).await.map_err(|e| {
                            format!("reading Secret {at}: {}", crate::cluster::error_chain(&e))
                        })?)?
                    }
                    Err(e) => {
                        return Err(format!(
                            "making Secret {at}: {}",
                            crate::cluster::error_chain(&e)
                        ));
                    }
                }
            }
        };
        *self.lock() = Some(key.clone());
        Ok(Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(namespace: &str, workers: u32) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "agentd.io/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "mnist", "namespace": namespace},
            "spec": {"replicaSpecs": {"Worker": {"replicas": workers, "template": {"spec": {
                "containers": [{"name": "tensorflow", "command": ["true"]}]}}}}},
        }))
        .expect("object")
    }

    #[test]
    fn a_signature_holds_for_its_owner_object_and_key_only() {
        let key = SubmitterKey::from_bytes(&[7; 32]);
        let ada = r#"{"uid":1000,"gid":1000,"user":"ada"}"#;
        let signature = key.sign(&object("default", 2), ada).expect("signed");
        assert_eq!(signature.len(), 64);
        assert!(key.verify(&object("default", 2), ada, &signature));
        let root = r#"{"uid":0,"gid":0,"user":"root"}"#;
        assert!(
            !key.verify(&object("default", 2), root, &signature),
            "another owner"
        );
        assert!(
            !key.verify(&object("default", 8), ada, &signature),
            "another spec"
        );
        assert!(
            !key.verify(&object("other", 2), ada, &signature),
            "another namespace"
        );
        let other = SubmitterKey::from_bytes(&[8; 32]);
        assert!(
            !other.verify(&object("default", 2), ada, &signature),
            "another key"
        );
        for bad in ["", "zz", &signature[1..], "é"] {
            assert!(!key.verify(&object("default", 2), ada, bad), "{bad:?}");
        }
    }
}
