//! `agentctl template save|list|show|delete`: saved manifests that jobs are made from with
//! `agentctl submit --template NAME --name NEW [--set PATH=VALUE]...`.

use std::path::PathBuf;

use agentd_api::Client;
use agentd_api::templates::{Template, TemplateList, TemplateUse};
use clap::Subcommand;
use hyper::Method;
use hyper::body::Bytes;

use crate::Failure;
use crate::jobs::{content_type, encode, now, read_manifest};
use crate::output::{self, Format, Table};

/// The values a job was made with, as `--set` takes them: `PATH=VALUE PATH=VALUE`.
pub fn values_text(used: &TemplateUse) -> String {
    used.values
        .iter()
        .map(|v| format!("{}={}", v.path, v.value))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Save FILE (a TrainingJob or TFJob manifest; `-` reads standard input) as template NAME,
    /// or replace your template NAME. It is checked as a submitted manifest is.
    Save { name: String, file: PathBuf },
    /// Every template on the agent.
    List,
    /// A template's manifest as it was saved (-o json|yaml: with its owner and times).
    Show { name: String },
    /// Delete your template NAME (admins: anyone's).
    Delete { name: String },
}

pub async fn template(
    client: &Client,
    command: TemplateCommand,
    format: Format,
) -> Result<(), Failure> {
    match command {
        TemplateCommand::Save { name, file } => {
            let manifest = read_manifest(&file)?;
            let response = client
                .send(
                    Method::PUT,
                    &format!("/v1/templates/{}", encode(&name)),
                    Some(content_type(&file)),
                    Bytes::from(manifest),
                )
                .await?;
            let created = response.status() == hyper::StatusCode::CREATED;
            let bytes = agentd_api::client::read_body(response).await?;
            let value: serde_json::Value = agentd_api::client::decode(&bytes)?;
            if !output::print_structured(format, &value)? {
                println!(
                    "template {name} {}",
                    if created { "saved" } else { "replaced" }
                );
            }
            Ok(())
        }
        TemplateCommand::List => {
            let value = client.get_value("/v1/templates").await?;
            if output::print_structured(format, &value)? {
                return Ok(());
            }
            let list: TemplateList =
                serde_json::from_value(value).map_err(|e| Failure::Request(e.to_string()))?;
            let mut table = Table::new(["NAME", "OWNER", "UPDATED", "SIZE"]);
            let now = now();
            for t in &list.templates {
                table.row(vec![
                    t.name.clone(),
                    t.owner.user.clone(),
                    format!(
                        "{} ago",
                        output::duration((now - t.updated_at).max(0.0) as u64)
                    ),
                    output::bytes(t.bytes),
                ]);
            }
            print!("{}", table.render(""));
            Ok(())
        }
        TemplateCommand::Show { name } => {
            let value = client
                .get_value(&format!("/v1/templates/{}", encode(&name)))
                .await?;
            if output::print_structured(format, &value)? {
                return Ok(());
            }
            let template: Template =
                serde_json::from_value(value).map_err(|e| Failure::Request(e.to_string()))?;
            print!("{}", template.manifest);
            if !template.manifest.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        TemplateCommand::Delete { name } => {
            let bytes = client
                .request(
                    Method::DELETE,
                    &format!("/v1/templates/{}", encode(&name)),
                    None,
                    Bytes::new(),
                )
                .await?;
            let value: serde_json::Value = agentd_api::client::decode(&bytes)?;
            if !output::print_structured(format, &value)? {
                println!("template {name} deleted");
            }
            Ok(())
        }
    }
}
