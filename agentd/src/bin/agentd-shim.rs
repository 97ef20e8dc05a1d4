//! `agentd-shim DIR`: the replica supervisor the agent starts for each replica (see
//! `agentd::exec::shim`). A binary of its own so that what runs beside every replica, for as
//! long as the replica, is small to start and to keep: it links only the supervisor.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: agentd-shim DIR (started by agentd for each replica, not by hand)");
        return ExitCode::from(2);
    };
    let code = agentd::exec::shim::main(Path::new(&dir));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
