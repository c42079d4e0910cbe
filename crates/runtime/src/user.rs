//! Docker `USER` resolution against the image's own `/etc/passwd` and `/etc/group`.

use std::path::{Path, PathBuf};

use crate::UserSpec;
use crate::error::{Error, Result};

/// The owner `COPY --chown=SPEC` gives: `UID[:GID]` as numbers, without a lookup; names
/// looked up by `resolve` (in the image's passwd and group files); a user without a group
/// takes the uid as gid, as Docker documents. The build and `strata dev`'s synced files both
/// use this rule.
pub fn chown_ids(spec: &str, resolve: impl FnOnce(&str) -> Result<UserSpec>) -> Result<(u32, u32)> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let num = |s: &str| s.parse::<u32>().ok();
    Ok(match (num(u), g.map(num)) {
        (Some(uid), None) => (uid, uid),
        (Some(uid), Some(Some(gid))) => (uid, gid),
        _ => {
            let user = resolve(spec)?;
            (user.uid, if g.is_some() { user.gid } else { user.uid })
        }
    })
}

/// Resolves Docker's `USER` string (`name`, `uid`, `name:group`, `uid:gid`, or empty for root)
/// against `/etc/passwd` and `/etc/group` of an image, looked up through `layers_top_first`:
/// the first layer directory with an entry at `etc/passwd` (resp. `etc/group`) supplies it.
///
/// Follows runc/moby's `GetExecUser`: a numeric uid needs no passwd entry (its group is then
/// 0); a name must exist. Without an explicit group the primary group comes from passwd and
/// the supplementary groups are the groups that list the user; with one, the group is only
/// that (a name must exist in `/etc/group`, a number need not).
pub fn resolve_user(layers_top_first: &[PathBuf], user: &str) -> Result<UserSpec> {
    let passwd = read_image_file(layers_top_first, "passwd", user)?;
    let group = read_image_file(layers_top_first, "group", user)?;
    resolve_user_in(passwd.as_deref(), group.as_deref(), user)
}

/// The file `etc/<name>` of the topmost layer that has an entry there; `None` when no layer has
/// one or the winning entry is not a regular file (a whiteout, a symlink we do not follow out
/// of the layer, a directory).
fn read_image_file(layers_top_first: &[PathBuf], name: &str, user: &str) -> Result<Option<String>> {
    for layer in layers_top_first {
        let etc = layer.join("etc");
        let Ok(etc_meta) = std::fs::symlink_metadata(&etc) else {
            continue;
        };
        if !etc_meta.is_dir() {
            return Ok(None);
        }
        let path = etc.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {
                return read_text(&path, user).map(Some);
            }
            Ok(_) => return Ok(None),
            Err(_) => continue,
        }
    }
    Ok(None)
}

fn read_text(path: &Path, user: &str) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::User {
        user: user.to_string(),
        reason: format!("reading `{}`: {e}", path.display()),
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next();
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(PasswdEntry { name, uid, gid })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next();
        let gid = f.next()?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        Some(GroupEntry { name, gid, members })
    })
}

fn resolve_user_in(passwd: Option<&str>, group: Option<&str>, user: &str) -> Result<UserSpec> {
    let err = |reason: String| Error::User {
        user: user.to_string(),
        reason,
    };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // No USER means root, looked up like "0" so root's groups apply.
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let numeric_uid: Option<u32> = user_part.parse().ok();

    let entry = passwd.and_then(|text| {
        passwd_entries(text).find(|e| match numeric_uid {
            Some(uid) => e.uid == uid || e.name == user_part,
            None => e.name == user_part,
        })
    });
    let (uid, mut gid, matched_name) = match (&entry, numeric_uid) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name)),
        (None, Some(uid)) => (uid, 0, None),
        (None, None) => {
            return Err(err(match passwd {
                Some(_) => "no matching entry in the image's /etc/passwd".to_string(),
                None => "the image has no /etc/passwd; use a numeric uid".to_string(),
            }));
        }
    };

    let mut additional_gids = Vec::new();
    match group_part {
        Some("") => return Err(err("empty group after `:`".to_string())),
        Some(g) => {
            let found = group.and_then(|text| group_entries(text).find(|e| e.name == g));
            gid = match (found, g.parse::<u32>()) {
                (Some(e), _) => e.gid,
                (None, Ok(n)) => n,
                (None, Err(_)) => {
                    return Err(err(format!(
                        "group `{g}`: no matching entry in the image's /etc/group"
                    )));
                }
            };
        }
        None => {
            // Supplementary groups only come with the implicit form, as in runc.
            if let (Some(name), Some(text)) = (matched_name, group) {
                for e in group_entries(text) {
                    if e.members.contains(&name) && !additional_gids.contains(&e.gid) {
                        additional_gids.push(e.gid);
                    }
                }
            }
        }
    }
    Ok(UserSpec {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chown_ids_take_numbers_as_they_are_and_names_from_the_lookup() {
        let lookup = |name: &str| -> Result<UserSpec> {
            assert_eq!(
                name.split(':').next(),
                Some("app"),
                "only names are looked up"
            );
            Ok(UserSpec {
                uid: 1000,
                gid: 2000,
                additional_gids: Vec::new(),
            })
        };
        assert_eq!(chown_ids("7", lookup).unwrap(), (7, 7));
        assert_eq!(chown_ids("7:8", lookup).unwrap(), (7, 8));
        // A user without a group takes the uid as gid; with one, the lookup's group.
        assert_eq!(chown_ids("app", lookup).unwrap(), (1000, 1000));
        assert_eq!(chown_ids("app:app", lookup).unwrap(), (1000, 2000));
        let unknown = |u: &str| {
            Err(Error::User {
                user: u.into(),
                reason: "no such user".into(),
            })
        };
        assert!(chown_ids("nobody", unknown).is_err());
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # comment\n\
                          app:x:1000:1001::/home/app:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/:/bin/false\n";
    const GROUP: &str = "root:x:0:\n\
                         wheel:x:10:root,app\n\
                         appgrp:x:1001:\n\
                         audio:x:29:app\n\
                         nogroup:x:65534:\n";

    fn r(user: &str) -> Result<UserSpec> {
        resolve_user_in(Some(PASSWD), Some(GROUP), user)
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(
            r("app").unwrap(),
            UserSpec {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![10, 29]
            }
        );
        assert_eq!(r("1000").unwrap(), r("app").unwrap());
        assert_eq!(
            r("").unwrap(),
            UserSpec {
                uid: 0,
                gid: 0,
                additional_gids: vec![10]
            }
        );
        assert_eq!(
            r("app:audio").unwrap(),
            UserSpec {
                uid: 1000,
                gid: 29,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("4242:4343").unwrap(),
            UserSpec {
                uid: 4242,
                gid: 4343,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("4242").unwrap(),
            UserSpec {
                uid: 4242,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(r("nobody:nogroup").unwrap().gid, 65534);
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = r("ghost").unwrap_err().to_string();
        assert!(e.contains("ghost") && e.contains("/etc/passwd"), "{e}");
        let e = r("app:ghosts").unwrap_err().to_string();
        assert!(e.contains("ghosts") && e.contains("/etc/group"), "{e}");
        assert!(resolve_user_in(None, None, "app").is_err());
        assert_eq!(resolve_user_in(None, None, "7:8").unwrap().uid, 7);
    }

    #[test]
    fn the_primary_group_goes_first_among_the_supplementary_ones_once() {
        let u = |gid, extra: &[u32]| UserSpec {
            uid: 5,
            gid,
            additional_gids: extra.to_vec(),
        };
        assert_eq!(u(8, &[]).with_primary_group().additional_gids, [8]);
        assert_eq!(
            u(8, &[10, 29]).with_primary_group().additional_gids,
            [8, 10, 29]
        );
        assert_eq!(
            u(10, &[10, 29]).with_primary_group().additional_gids,
            [10, 29]
        );
    }
}
