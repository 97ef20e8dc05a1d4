//! `agentctl nodes`, `agentctl drain NODE` and `agentctl resume NODE`.

use agentd_api::{AgentState, Client, NodeList, NodeSummary};
use hyper::Method;
use hyper::body::Bytes;

use crate::Failure;
use crate::output::{self, Format, Table};

pub async fn list(client: &Client, format: Format) -> Result<(), Failure> {
    let value = client.get_value("/v1/nodes").await?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let list: NodeList = serde_json::from_value(value)
        .map_err(|e| Failure::Request(format!("unexpected node list from the agent: {e}")))?;
    print!("{}", render(&list));
    Ok(())
}

/// `drain: true` drains the node, `false` resumes it.
pub async fn drain(
    client: &Client,
    name: &str,
    drain: bool,
    format: Format,
) -> Result<(), Failure> {
    let action = if drain { "drain" } else { "resume" };
    let path = format!("/v1/nodes/{}/{action}", crate::jobs::encode(name));
    let bytes = client
        .request(Method::POST, &path, None, Bytes::new())
        .await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::Request(format!("unexpected answer from the agent: {e}")))?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let node: NodeSummary = serde_json::from_value(value)
        .map_err(|e| Failure::Request(format!("unexpected answer from the agent: {e}")))?;
    if node.drained {
        println!(
            "node {} drained: no new placements until `agentctl resume {}`",
            node.name, node.name
        );
    } else {
        println!("node {} resumed: it takes new placements again", node.name);
    }
    if node.schedulable.is_none() {
        // Resumed by an agent that may not read Nodes: a cordon would still keep work off it.
        println!(
            "(recorded in its AgentNode; this agent may not read Nodes, so it cannot tell whether the Node is also cordoned)"
        );
    }
    Ok(())
}

pub fn render(list: &NodeList) -> String {
    let mut table = Table::new([
        "NAME",
        "GPUS",
        "PRODUCT",
        "CPU",
        "MEMORY",
        "READY",
        "AGENT",
        "SCHEDULABLE",
        "TAINTS",
    ]);
    for n in &list.nodes {
        table.row(vec![
            n.name.clone(),
            format!("{}/{}", n.gpus.healthy, n.gpus.total),
            if n.gpus.product.is_empty() {
                "-".into()
            } else {
                n.gpus.product.clone()
            },
            n.cpu_cores.to_string(),
            output::bytes(n.memory_bytes),
            match n.ready.as_str() {
                "True" => "Ready".to_owned(),
                "False" => "NotReady".to_owned(),
                other => other.to_owned(),
            },
            match (n.agent.state, n.agent.age_seconds) {
                (AgentState::Fresh, Some(age)) => output::duration(age),
                (AgentState::Stale, Some(age)) => format!("stale ({})", output::duration(age)),
                (AgentState::Stale, None) => "stale".to_owned(),
                (AgentState::None, _) | (AgentState::Fresh, None) => "none".to_owned(),
            },
            match (n.schedulable, n.drained) {
                (_, true) => "no (drained)".to_owned(),
                (Some(true), false) => "yes".to_owned(),
                (Some(false), false) => "no (cordoned)".to_owned(),
                (None, false) => "unknown".to_owned(),
            },
            if n.taints.is_empty() {
                "-".to_owned()
            } else {
                n.taints.join(",")
            },
        ]);
    }
    let mut text = table.render("");
    if let Some(why) = &list.partial {
        text.push_str(&format!("\nREADY and SCHEDULABLE unknown: {why}.\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use agentd_api::{AgentPresence, NodeGpus};

    use super::*;

    #[test]
    fn columns_say_what_a_person_acts_on() {
        let node = |name: &str, state, age, schedulable, drained| NodeSummary {
            name: name.into(),
            gpus: NodeGpus {
                total: 8,
                healthy: 7,
                product: "NVIDIA H200".into(),
            },
            cpu_cores: 64,
            memory_bytes: 512 << 30,
            ready: "True".into(),
            schedulable: Some(schedulable),
            drained,
            agent: AgentPresence {
                state,
                age_seconds: age,
            },
            taints: Vec::new(),
        };
        let text = render(&NodeList {
            nodes: vec![
                node("a", AgentState::Fresh, Some(3), true, false),
                node("b", AgentState::Stale, Some(95), false, true),
                node("c", AgentState::None, None, false, false),
                NodeSummary {
                    taints: vec![
                        "dedicated=ml:NoSchedule".into(),
                        "maintenance:NoExecute".into(),
                    ],
                    ..node("e", AgentState::Fresh, Some(1), true, false)
                },
            ],
            partial: None,
        });
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(
            lines[1].contains("7/8") && lines[1].contains("NVIDIA H200"),
            "{text}"
        );
        assert!(
            lines[2].contains("stale") && lines[2].contains("no (drained)"),
            "{text}"
        );
        assert!(
            lines[3].contains("none") && lines[3].contains("no (cordoned)"),
            "{text}"
        );
        assert!(lines[1].ends_with(" -"), "no taints: {text}");
        assert!(
            lines[4].ends_with("dedicated=ml:NoSchedule,maintenance:NoExecute"),
            "{text}"
        );
        assert_eq!(lines.len(), 5, "no footer for a full view: {text}");

        let mut unknown = node("d", AgentState::Fresh, Some(1), true, false);
        unknown.ready = "Unknown".into();
        unknown.schedulable = None;
        let text = render(&NodeList {
            nodes: vec![unknown],
            partial: Some("this agent's role may not read Nodes".into()),
        });
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("Unknown")
                && lines[1].trim_end_matches(['-', ' ']).ends_with("unknown"),
            "{text}"
        );
        assert_eq!(
            lines.last().copied(),
            Some("READY and SCHEDULABLE unknown: this agent's role may not read Nodes."),
            "{text}"
        );
    }
}
