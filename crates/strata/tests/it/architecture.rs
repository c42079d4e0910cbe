//! The crates table of `docs/ARCHITECTURE.md` against the code: each workspace crate depends
//! (normal and build dependencies; dev-dependencies aside) on exactly the workspace crates its
//! "depends on" column names. A new edge needs a new word in the table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

type Edges = BTreeMap<String, BTreeSet<String>>;

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap()
}

/// Each workspace crate → the other workspace crates it depends on, from `cargo metadata`.
fn edges_in_code() -> Edges {
    // `cargo test` sets CARGO to the cargo that runs it.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: BTreeSet<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().unwrap())
                .filter(|n| names.contains(n))
                .map(str::to_string)
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

/// The cells of a Markdown table row, trimmed.
fn cells(row: &str) -> Vec<&str> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// The text between the first pair of backticks in `cell`.
fn code_span(cell: &str) -> Option<&str> {
    let (_, rest) = cell.split_once('`')?;
    Some(rest.split_once('`')?.0)
}

/// The crates table of `doc`: crate → the crates its "depends on" column names. A short name
/// (`oci`) stands for its package (`strata-oci`); `–` for none.
fn edges_in_table(doc: &str) -> Edges {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with("| crate |"));
    let header = lines
        .next()
        .expect("no crates table (a `| crate | … | depends on |` header)");
    let column = cells(header)
        .iter()
        .position(|c| *c == "depends on")
        .expect("no `depends on` column");
    let package = |name: &str| {
        let name = name.trim().trim_matches('`');
        if name == "strata" || name.starts_with("strata-") {
            name.to_string()
        } else {
            format!("strata-{name}")
        }
    };
    lines
        .skip(1) // |---|---|
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells = cells(row);
            let name = code_span(cells[0]).unwrap_or_else(|| panic!("no `crate` in {row}"));
            let deps = match cells[column] {
                "" | "–" | "-" => BTreeSet::new(),
                list => list.split(',').map(package).collect(),
            };
            (package(name), deps)
        })
        .collect()
}

#[test]
fn the_architecture_crates_table_matches_the_dependencies_in_the_code() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/ARCHITECTURE.md")).unwrap();
    let table = edges_in_table(&doc);
    let code = edges_in_code();
    let mut wrong = Vec::new();
    for name in table.keys().chain(code.keys()).collect::<BTreeSet<_>>() {
        match (table.get(name), code.get(name)) {
            (None, _) => wrong.push(format!("`{name}` is not in the table")),
            (_, None) => wrong.push(format!(
                "`{name}` is in the table but not a workspace crate"
            )),
            (Some(t), Some(c)) if t != c => {
                let list = |s: Vec<&String>| {
                    s.iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut why = Vec::new();
                let undocumented = list(c.difference(t).collect());
                if !undocumented.is_empty() {
                    why.push(format!("depends on {undocumented}, which the table omits"));
                }
                let stale = list(t.difference(c).collect());
                if !stale.is_empty() {
                    why.push(format!("does not depend on {stale}, which the table names"));
                }
                wrong.push(format!("`{name}` {}", why.join("; ")));
            }
            _ => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/ARCHITECTURE.md's crates table is out of date:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_table_reader_takes_short_names_and_dashes() {
    let doc = "text\n\n| crate | job | depends on | status |\n|---|---|---|---|\n\
               | `strata-oci` | types | – | landed |\n\
               | `strata` (binary) | CLI | oci, registry-server | |\n\nmore | text\n";
    let table = edges_in_table(doc);
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(table.len(), 2);
    assert_eq!(table["strata-oci"], set(&[]));
    assert_eq!(
        table["strata"],
        set(&["strata-oci", "strata-registry-server"])
    );
}
