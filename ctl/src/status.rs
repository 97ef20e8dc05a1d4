//! `agentctl status` and `agentctl node`.

use agentd_api::{Client, GpuInfo, NodeInventory, Status};

use crate::Failure;
use crate::output::{self, Format, Table};

pub async fn status(client: &Client, format: Format) -> Result<(), Failure> {
    let value = client.get_value("/v1/status").await?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let status: Status = serde_json::from_value(value)
        .map_err(|e| Failure::Request(format!("unexpected status from the agent: {e}")))?;
    print!("{}", render_status(&status));
    Ok(())
}

pub async fn node(client: &Client, format: Format) -> Result<(), Failure> {
    let value = client.get_value("/v1/node").await?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let node: NodeInventory = serde_json::from_value(value)
        .map_err(|e| Failure::Request(format!("unexpected inventory from the agent: {e}")))?;
    print!("{}", render_node(&node));
    Ok(())
}

pub fn render_status(status: &Status) -> String {
    let (a, n) = (&status.agent, &status.node);
    let mut text = format!(
        "Node     {}  ({}, agentd {}, up {})\n",
        n.name,
        a.mode,
        a.version,
        output::duration(a.uptime_seconds)
    );
    if let Some(c) = &status.cluster {
        text += &format!(
            "Cluster  {} (namespace {}): {}\n",
            c.server,
            c.namespace,
            match (c.reachable, &c.last_error) {
                (true, None) => "reachable".to_owned(),
                (true, Some(e)) => format!("reachable, but refused: {e}"),
                (false, Some(e)) => format!("UNREACHABLE: {e}"),
                (false, None) => "not contacted yet".to_owned(),
            }
        );
        match (&c.leader, c.leading) {
            (Some(leader), true) => text += &format!("Leader   {leader} (this agent)\n"),
            (Some(leader), false) => text += &format!("Leader   {leader}\n"),
            (None, _) => {}
        }
    }
    text += &format!(
        "CPU      {}  {} cores ({} threads), {:.0}% busy\n",
        n.cpu.model,
        n.cpu.physical_cores,
        n.cpu.logical_cores,
        n.cpu.utilization * 100.0
    );
    text += &format!(
        "Memory   {} available of {}\n",
        output::bytes(n.memory.available_bytes),
        output::bytes(n.memory.total_bytes)
    );
    for (i, d) in n.disks.iter().enumerate() {
        text += &format!(
            "{}{}  {} free of {} ({})\n",
            if i == 0 { "Disks    " } else { "         " },
            d.mount_point,
            output::bytes(d.available_bytes),
            output::bytes(d.total_bytes),
            d.filesystem
        );
    }
    text += &gpu_section(n);
    text
}

fn gpu_section(n: &NodeInventory) -> String {
    let Some(driver) = &n.gpu_driver else {
        return "GPUs     none (no NVML library found; see `agentd --print-config`, inventory.nvml_library)\n".to_owned();
    };
    let healthy = n.gpus.iter().filter(|g| g.healthy).count();
    let mut text = format!(
        "GPUs     {} ({} healthy), driver {}, CUDA {}\n",
        n.gpus.len(),
        healthy,
        driver.driver_version,
        driver.cuda_version
    );
    let mut table = Table::new([
        "GPU",
        "MODEL",
        "MEMORY USED",
        "UTIL",
        "TEMP",
        "POWER",
        "HEALTH",
    ]);
    for g in &n.gpus {
        table.row(gpu_row(g));
    }
    text += &table.render("  ");
    text
}

fn gpu_row(g: &GpuInfo) -> Vec<String> {
    vec![
        g.index.to_string(),
        g.name.clone(),
        format!(
            "{} / {}",
            output::bytes(g.memory_used_bytes),
            output::bytes(g.memory_total_bytes)
        ),
        format!("{}%", g.utilization_gpu_percent),
        g.temperature_celsius
            .map_or("-".into(), |t| format!("{t}C")),
        match (g.power_usage_watts, g.power_limit_watts) {
            (Some(u), Some(l)) => format!("{u:.0}/{l:.0} W"),
            (Some(u), None) => format!("{u:.0} W"),
            _ => "-".into(),
        },
        match (&g.healthy, &g.health_reason) {
            (true, _) => "healthy".into(),
            (false, Some(reason)) => format!("UNHEALTHY: {reason}"),
            (false, None) => "UNHEALTHY".into(),
        },
    ]
}

pub fn render_node(n: &NodeInventory) -> String {
    let mut text = format!(
        "Name       {}\nHostname   {}\nOS         {}\nKernel     {}\nBoot time  {} (Unix)\n",
        n.name, n.hostname, n.os, n.kernel, n.boot_time
    );
    text += &format!(
        "CPU        {}: {} physical cores, {} logical, {:.1}% busy\n",
        n.cpu.model,
        n.cpu.physical_cores,
        n.cpu.logical_cores,
        n.cpu.utilization * 100.0
    );
    text += &format!(
        "Memory     total {}, available {}; swap {} of {} free\n",
        output::bytes(n.memory.total_bytes),
        output::bytes(n.memory.available_bytes),
        output::bytes(n.memory.swap_free_bytes),
        output::bytes(n.memory.swap_total_bytes)
    );
    let mut disks = Table::new(["MOUNT", "DEVICE", "FS", "SIZE", "AVAILABLE"]);
    for d in &n.disks {
        disks.row(vec![
            d.mount_point.clone(),
            d.device.clone(),
            d.filesystem.clone(),
            output::bytes(d.total_bytes),
            output::bytes(d.available_bytes),
        ]);
    }
    text += "Disks\n";
    text += &disks.render("  ");
    text += &gpu_section(n);
    for g in &n.gpus {
        text += &format!(
            "  GPU {}: {} {} at {}",
            g.index, g.name, g.uuid, g.pci_bus_id
        );
        if let Some(ecc) = g.ecc_errors {
            text += &format!(
                ", ECC corrected {} uncorrected {}",
                ecc.corrected, ecc.uncorrected
            );
        }
        if let Some(e) = g.energy_joules {
            text += &format!(", {e:.0} J since driver load");
        }
        for x in &g.xid_errors {
            text += &format!(", XID {} x{}", x.xid, x.count);
        }
        text.push('\n');
    }
    text
}
