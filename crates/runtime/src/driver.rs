//! [`MachineDriver`]: what the host agent and the CLI need of a machine runtime, so that
//! another one (a microVM monitor, say) can stand where runc does. [`Runc`] is runc's.

use std::time::Duration;

use crate::machine::{self, ExecOptions, MachineSpec, MachineStatus, StopOutcome};
use crate::{Result, RuntimeConfig};

/// Starts, watches, stops and removes machines. Calls may come from several threads.
pub trait MachineDriver: Send + Sync + std::fmt::Debug {
    /// Starts `spec` detached (its root filesystem mounted, its network ready); returns the
    /// host pid of its PID 1, a child of the caller when the caller is a subreaper.
    fn start(&self, spec: &MachineSpec) -> Result<u32>;
    /// What the runtime knows of machine `id`.
    fn status(&self, id: &str) -> Result<MachineStatus>;
    /// Sends `signal`, then SIGKILL after `grace` if it still runs.
    fn stop(&self, spec: &MachineSpec, signal: i32, grace: Duration) -> Result<StopOutcome>;
    /// Runs `args` inside the running machine `id` (its root and namespaces) as `opts` say;
    /// returns the exit code.
    fn exec(&self, id: &str, args: &[String], opts: &ExecOptions) -> Result<i32>;
    /// Sends `signal` to the running machine `id`'s first process.
    fn signal(&self, id: &str, signal: i32) -> Result<()>;
    /// Removes what a stopped machine's run left (the runtime's container, its root's mount),
    /// keeping its directory for the next start.
    fn cleanup(&self, spec: &MachineSpec) -> Result<()>;
    /// Stops the machine and removes it all: container, network, directory (volumes stay).
    fn destroy(&self, spec: &MachineSpec) -> Result<()>;
}

/// Machines under runc (docs/machines.md): tini as PID 1, an overlay root, a network
/// namespace of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runc {
    /// Where runc is and where it keeps its state.
    pub config: RuntimeConfig,
}

impl MachineDriver for Runc {
    fn start(&self, spec: &MachineSpec) -> Result<u32> {
        machine::machine_start(&self.config, spec)
    }

    fn status(&self, id: &str) -> Result<MachineStatus> {
        machine::machine_status(&self.config, id)
    }

    fn stop(&self, spec: &MachineSpec, signal: i32, grace: Duration) -> Result<StopOutcome> {
        machine::machine_stop(&self.config, spec, signal, grace)
    }

    fn exec(&self, id: &str, args: &[String], opts: &ExecOptions) -> Result<i32> {
        machine::machine_exec(&self.config, id, args, opts)
    }

    fn signal(&self, id: &str, signal: i32) -> Result<()> {
        machine::machine_signal(&self.config, id, signal)
    }

    fn cleanup(&self, spec: &MachineSpec) -> Result<()> {
        machine::machine_cleanup(&self.config, spec)
    }

    fn destroy(&self, spec: &MachineSpec) -> Result<()> {
        machine::machine_destroy(&self.config, spec)
    }
}
