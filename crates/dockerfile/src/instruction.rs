//! Typed Dockerfile instructions, as written (before variable expansion).

use std::time::Duration;

/// Where an instruction sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// 1-based line of the instruction keyword.
    pub start_line: usize,
    /// 1-based last line (continuations and heredoc bodies included).
    pub end_line: usize,
    /// 1-based column of the instruction keyword.
    pub column: usize,
}

/// One instruction with its place and original text.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    /// The typed instruction.
    pub instruction: Instruction,
    /// Where it is.
    pub span: Span,
    /// The logical line as written (continuations joined, heredoc bodies not included).
    pub original: String,
}

/// A command line in exec form (a JSON array) or shell form (a string for the shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// `["prog", "arg"]`: run directly.
    Exec(Vec<String>),
    /// `prog arg`: handed to the stage's `SHELL`.
    Shell(String),
}

/// A here-document attached to `RUN`, `COPY` or `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word (quotes removed): also the file name for `COPY <<EOF`.
    pub name: String,
    /// The body, each line ending in `\n`; leading tabs already removed when `chomp`.
    pub content: String,
    /// `false` when the delimiter was quoted (`<<"EOF"`, `<<'EOF'`): no expansion.
    pub expand: bool,
    /// `<<-EOF`: leading tabs are stripped from body lines and the delimiter line.
    pub chomp: bool,
    /// The file descriptor before `<<` (`3<<EOF`), 0 when absent.
    pub fd: u32,
}

/// `KEY=VALUE` of `ENV` and `LABEL`, raw: quotes are still in place until expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key as written.
    pub key: String,
    /// The value as written.
    pub value: String,
}

/// One `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// Variable name.
    pub name: String,
    /// Default as written, `None` for a bare `ARG name`.
    pub default: Option<String>,
}

/// `FROM [--platform=P] image [AS name]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct From {
    /// The base image (or stage name) as written; may hold `$VAR` from global ARGs.
    pub image: String,
    /// `--platform` as written.
    pub platform: Option<String>,
    /// Stage name, lower-cased like Docker does.
    pub name: Option<String>,
}

/// The `--mount` types of `RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// Bind a context or stage directory (read-only by default).
    Bind,
    /// A persistent cache directory.
    Cache,
    /// A tmpfs.
    Tmpfs,
    /// A build secret as a file (or env var).
    Secret,
    /// An SSH agent socket.
    Ssh,
}

/// `sharing=` of a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Concurrent writers share one directory.
    Shared,
    /// Each writer gets its own directory.
    Private,
    /// Writers wait for each other.
    Locked,
}

/// One `RUN --mount=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `type=`; `bind` when absent.
    pub kind: MountType,
    /// `from=`: a stage or image providing the source.
    pub from: Option<String>,
    /// `source=`/`src=`.
    pub source: Option<String>,
    /// `target=`/`dst=`/`destination=`.
    pub target: Option<String>,
    /// Read-only: explicit `ro`/`rw`, else read-only for bind, secret and ssh.
    pub readonly: bool,
    /// `id=`.
    pub id: Option<String>,
    /// `sharing=` (cache mounts only).
    pub sharing: Option<Sharing>,
    /// `mode=` (octal).
    pub mode: Option<u32>,
    /// `uid=`.
    pub uid: Option<u32>,
    /// `gid=`.
    pub gid: Option<u32>,
    /// `size=` in bytes (tmpfs only).
    pub size: Option<u64>,
    /// `required` (secret and ssh only).
    pub required: bool,
    /// `env=`: expose a secret as this environment variable.
    pub env: Option<String>,
}

/// `RUN --network=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The builder's default.
    Default,
    /// No network.
    None,
    /// The host's network.
    Host,
}

/// `RUN --security=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Extra privileges.
    Insecure,
    /// The default sandbox.
    Sandbox,
}

/// `RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The command (not expanded by the builder: the shell does that).
    pub command: CommandLine,
    /// Here-documents, in order.
    pub heredocs: Vec<Heredoc>,
    /// `--mount`s, parsed from the raw flag values (see [`Run::mount_flags`]).
    pub mounts: Vec<Mount>,
    /// Raw `--mount` values, kept so the engine can re-parse them after expansion.
    pub mount_flags: Vec<String>,
    /// `--network`.
    pub network: Option<Network>,
    /// `--security`.
    pub security: Option<Security>,
}

/// Files and destination of `COPY`/`ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcesAndDest {
    /// Source paths or URLs as written.
    pub sources: Vec<String>,
    /// Inline sources from heredocs.
    pub heredocs: Vec<Heredoc>,
    /// Destination as written.
    pub dest: String,
    /// Whether the arguments were a JSON array.
    pub json: bool,
}

/// `COPY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// Sources and destination.
    pub files: SourcesAndDest,
    /// `--from`.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
}

/// `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Add {
    /// Sources and destination.
    pub files: SourcesAndDest,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `--checksum`.
    pub checksum: Option<String>,
    /// `--keep-git-dir`, `None` when not given.
    pub keep_git_dir: Option<bool>,
    /// `--unpack`, `None` when not given.
    pub unpack: Option<bool>,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable the base image's check.
    None,
    /// `HEALTHCHECK [options] CMD ...`.
    Check {
        /// `CMD ["..."]` (exec) or `CMD ...` (run as `CMD-SHELL`).
        command: CommandLine,
        /// `--interval`.
        interval: Option<Duration>,
        /// `--timeout`.
        timeout: Option<Duration>,
        /// `--start-period`.
        start_period: Option<Duration>,
        /// `--start-interval`.
        start_interval: Option<Duration>,
        /// `--retries`.
        retries: Option<u32>,
    },
}

/// `ONBUILD`: a trigger kept for images built from this one.
#[derive(Debug, Clone, PartialEq)]
pub struct Onbuild {
    /// The trigger's text after `ONBUILD`, heredoc bodies appended as Docker does.
    pub expression: String,
    /// The trigger, parsed (checked now so mistakes show up here, not downstream).
    pub instruction: Box<Instruction>,
}

/// A Dockerfile instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    /// `FROM`.
    From(From),
    /// `RUN`.
    Run(Run),
    /// `CMD`.
    Cmd(CommandLine),
    /// `LABEL k=v ...`.
    Label(Vec<KeyValue>),
    /// `MAINTAINER` (deprecated).
    Maintainer(String),
    /// `EXPOSE port[/proto] ...`, as written.
    Expose(Vec<String>),
    /// `ENV k=v ...` or `ENV k v`.
    Env(Vec<KeyValue>),
    /// `ADD`.
    Add(Add),
    /// `COPY`.
    Copy(Copy),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `VOLUME`.
    Volume(Vec<String>),
    /// `USER user[:group]`.
    User(String),
    /// `WORKDIR`.
    Workdir(String),
    /// `ARG name[=default] ...`.
    Arg(Vec<ArgDecl>),
    /// `ONBUILD`.
    Onbuild(Onbuild),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `SHELL ["exe", "flag"]`.
    Shell(Vec<String>),
}

impl Instruction {
    /// The keyword, upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::From(_) => "FROM",
            Instruction::Run(_) => "RUN",
            Instruction::Cmd(_) => "CMD",
            Instruction::Label(_) => "LABEL",
            Instruction::Maintainer(_) => "MAINTAINER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Env(_) => "ENV",
            Instruction::Add(_) => "ADD",
            Instruction::Copy(_) => "COPY",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Volume(_) => "VOLUME",
            Instruction::User(_) => "USER",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::Arg(_) => "ARG",
            Instruction::Onbuild(_) => "ONBUILD",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Shell(_) => "SHELL",
        }
    }
}

/// `USER` split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// User name or uid.
    pub user: String,
    /// Group name or gid, when given.
    pub group: Option<String>,
}

impl UserSpec {
    /// Splits `user[:group]` (after expansion).
    pub fn parse(s: &str) -> Self {
        match s.split_once(':') {
            Some((u, g)) => UserSpec {
                user: u.to_string(),
                group: Some(g.to_string()),
            },
            None => UserSpec {
                user: s.to_string(),
                group: None,
            },
        }
    }
}

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// One `EXPOSE` entry: a port or an inclusive range, with its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// First port.
    pub start: u16,
    /// Last port (equal to `start` for a single port).
    pub end: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl Protocol {
    /// The lower-case name Docker writes in `ExposedPorts` (`tcp`, `udp`, `sctp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl PortSpec {
    /// The `ExposedPorts` keys this spec stands for, one per port of a range, protocol in
    /// lower case: `8000-8001/UDP` gives `8000/udp`, `8001/udp` (Docker's `nat.ParsePortSpecs`).
    pub fn exposed_keys(&self) -> Vec<String> {
        (self.start..=self.end)
            .map(|p| format!("{p}/{}", self.protocol.as_str()))
            .collect()
    }

    /// Parses `80`, `80/udp`, `8000-8010/tcp` (after expansion).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ports, proto) = match s.split_once('/') {
            Some((p, proto)) => (p, proto),
            None => (s, "tcp"),
        };
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(format!("invalid proto: {proto}")),
        };
        let num = |p: &str| -> Result<u16, String> {
            p.parse::<u16>()
                .map_err(|_| format!("invalid containerPort: {p}"))
        };
        let (start, end) = match ports.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let p = num(ports)?;
                (p, p)
            }
        };
        if end < start {
            return Err(format!(
                "invalid range specified for containerPort: {ports}"
            ));
        }
        Ok(PortSpec {
            start,
            end,
            protocol,
        })
    }
}
