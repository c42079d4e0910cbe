//! `RUN --mount=` values: CSV fields of `key=value`, checked like BuildKit's
//! `instructions/commands_runmount.go`.

use crate::instruction::{Mount, MountType, Sharing};

/// Expands a mount option value; `None` at parse time, when values holding `$` are kept as
/// written and not checked yet.
pub(crate) type Expander<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// Splits a CSV record (RFC 4180 quoting, `""` for a quote inside quotes).
fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(
                            "failed to parse csv mounts: extraneous or missing \" in quoted-field"
                                .into(),
                        );
                    }
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(',') => out.push(field),
                Some(_) => {
                    return Err(
                        "failed to parse csv mounts: extraneous or missing \" in quoted-field"
                            .into(),
                    );
                }
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field);
                        return Ok(out);
                    }
                    Some(',') => break,
                    Some('"') => {
                        return Err(
                            "failed to parse csv mounts: bare \" in non-quoted-field".into()
                        );
                    }
                    Some(c) => field.push(c),
                }
            }
            out.push(field);
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid value for {key}: {v}")),
    }
}

/// docker/go-units `RAMInBytes`: `512`, `64k`, `1.5g`, `10MiB`, binary multiples.
fn ram_in_bytes(v: &str) -> Result<u64, String> {
    let bad = || format!("invalid value for size: {v}");
    let num_len = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(num_len);
    if num.is_empty() {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0f64.powi(3),
        "t" => 1024.0f64.powi(4),
        "p" => 1024.0f64.powi(5),
        _ => return Err(bad()),
    };
    let total = n * mult;
    if !total.is_finite() || total >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(total as u64)
}

/// Parses one `--mount` value. With `expand == None` (parse time), values holding `$` are
/// kept raw for string options and left unchecked for typed ones, as BuildKit defers them.
pub(crate) fn parse_mount(raw: &str, expand: Option<Expander>) -> Result<Mount, String> {
    let mut m = Mount {
        kind: MountType::Bind,
        from: None,
        source: None,
        target: None,
        readonly: false,
        id: None,
        sharing: None,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        required: false,
        env: None,
    };
    let mut ro_auto = true;
    for field in csv_fields(raw)? {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v.to_string())),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(value) = value else {
            match key.as_str() {
                "readonly" | "ro" => {
                    m.readonly = true;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.readonly = false;
                    ro_auto = false;
                }
                "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                    m.required = true;
                }
                "required" => {
                    return Err(format!(
                        "unexpected key 'required' for mount type '{}'",
                        kind_name(m.kind)
                    ));
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            continue;
        };
        if key == "from" && value.find('$').is_some_and(|i| i + 1 != value.len()) {
            return Err(
                "'from' doesn't support variable expansion, define alias stage instead".into(),
            );
        }
        let deferred = expand.is_none() && value.contains('$');
        let value = match expand {
            Some(f) => f(&value)?,
            None => value,
        };
        match key.as_str() {
            "type" => {
                m.kind = match value.to_ascii_lowercase().as_str() {
                    "bind" => MountType::Bind,
                    "cache" => MountType::Cache,
                    "tmpfs" => MountType::Tmpfs,
                    "secret" => MountType::Secret,
                    "ssh" => MountType::Ssh,
                    _ if deferred => m.kind,
                    _ => return Err(format!("unsupported mount type {value:?}")),
                }
            }
            "from" => m.from = Some(value),
            "source" | "src" => m.source = Some(value),
            "target" | "dst" | "destination" => m.target = Some(value),
            "id" => m.id = Some(value),
            "env" => m.env = Some(value),
            _ if deferred => {
                // Typed values are checked once the engine expands them.
                if !matches!(
                    key.as_str(),
                    "readonly"
                        | "ro"
                        | "readwrite"
                        | "rw"
                        | "required"
                        | "size"
                        | "sharing"
                        | "mode"
                        | "uid"
                        | "gid"
                ) {
                    return Err(format!("unexpected key '{key}' in '{field}'"));
                }
            }
            "readonly" | "ro" => {
                m.readonly = parse_bool(&key, &value)?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.readonly = !parse_bool(&key, &value)?;
                ro_auto = false;
            }
            "required" => {
                if !matches!(m.kind, MountType::Secret | MountType::Ssh) {
                    return Err(format!(
                        "unexpected key 'required' for mount type '{}'",
                        kind_name(m.kind)
                    ));
                }
                m.required = parse_bool(&key, &value)?;
            }
            "size" => {
                if m.kind != MountType::Tmpfs {
                    return Err(format!(
                        "unexpected key 'size' for mount type '{}'",
                        kind_name(m.kind)
                    ));
                }
                m.size = Some(ram_in_bytes(&value)?);
            }
            "sharing" => {
                m.sharing = Some(match value.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(format!("unsupported sharing value {value:?}")),
                })
            }
            "mode" => {
                m.mode = Some(
                    u32::from_str_radix(&value, 8)
                        .map_err(|_| format!("invalid value {value} for mode"))?,
                )
            }
            "uid" => {
                m.uid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid value {value} for uid"))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid value {value} for gid"))?,
                )
            }
            _ => return Err(format!("unexpected key '{key}' in '{field}'")),
        }
    }
    let file_info = matches!(
        m.kind,
        MountType::Secret | MountType::Ssh | MountType::Cache
    );
    if !file_info {
        for (set, name) in [
            (m.mode.is_some(), "mode"),
            (m.uid.is_some(), "uid"),
            (m.gid.is_some(), "gid"),
        ] {
            if set {
                return Err(format!(
                    "{name} not allowed for {:?} type mounts",
                    kind_name(m.kind)
                ));
            }
        }
    }
    if ro_auto {
        m.readonly = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    if m.kind == MountType::Secret {
        if m.from.is_some() {
            return Err("secret mount should not have a from".into());
        }
        if m.sharing.is_some() {
            return Err("secret mount should not define sharing".into());
        }
        if m.source.is_none() && m.target.is_none() && m.id.is_none() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if m.source.is_some() && m.id.is_some() {
            return Err("both source and id can't be set".into());
        }
    }
    if m.sharing.is_some() && m.kind != MountType::Cache {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            kind_name(m.kind)
        ));
    }
    Ok(m)
}

fn kind_name(k: MountType) -> &'static str {
    match k {
        MountType::Bind => "bind",
        MountType::Cache => "cache",
        MountType::Tmpfs => "tmpfs",
        MountType::Secret => "secret",
        MountType::Ssh => "ssh",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_multiples() {
        assert_eq!(ram_in_bytes("512").unwrap(), 512);
        assert_eq!(ram_in_bytes("64k").unwrap(), 65536);
        assert_eq!(ram_in_bytes("1m").unwrap(), 1 << 20);
        assert_eq!(ram_in_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(ram_in_bytes("2GB").unwrap(), 2 << 30);
        assert!(ram_in_bytes("lots").is_err());
        assert!(ram_in_bytes("1x").is_err());
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(
            csv_fields(r#"type=bind,"source=a,b",target=/x"#).unwrap(),
            vec!["type=bind", "source=a,b", "target=/x"]
        );
        assert!(csv_fields(r#"type=bi"nd"#).is_err());
    }

    #[test]
    fn defaults_follow_type() {
        let bind = parse_mount("target=/x", None).unwrap();
        assert!(bind.readonly);
        let cache = parse_mount("type=cache,target=/x", None).unwrap();
        assert!(!cache.readonly);
        assert!(parse_mount("type=bind,uid=1", None).is_err());
        assert!(parse_mount("type=secret", None).is_err());
        assert!(parse_mount("type=cache,target=/x,sharing=weird", None).is_err());
    }
}
