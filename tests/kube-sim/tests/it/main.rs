//! kube-sim integration tests: the HTTP API's semantics, the simulated kubelets, and fidelity
//! with clients written elsewhere (kubectl, the Python `kubernetes` client, kube-rs).

mod api;
mod auth;
mod common;
mod kube_rs;
mod kubectl;
mod kubelet;
mod manifests;
mod python;
