//! `config/herald.example.toml` and `docs/configuration.md`, generated from the doc comments
//! and defaults of [`Config`]. A test keeps the committed files equal to what this produces
//! (`UPDATE_GOLDEN=1 cargo test -p herald config` rewrites them).

use serde_json::{Map, Value};

use super::{flatten, toml_literal, Config};

/// One documented key or section, in declaration order.
struct Entry {
    path: String,
    description: String,
    /// `None` for a section (a table).
    default: Option<Value>,
}

fn entries() -> Vec<Entry> {
    let schema = schemars::schema_for!(Config);
    let root = schema.as_value();
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut out = Vec::new();
    walk(root, root, &defaults, "", &mut out);
    out
}

fn walk(root: &Value, schema: &Value, values: &Value, prefix: &str, out: &mut Vec<Entry>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return };
    let empty = Map::new();
    let values = values.as_object().unwrap_or(&empty);
    // TOML wants a table's plain keys before its sub-tables.
    let (tables, scalars): (Vec<_>, Vec<_>) =
        props.iter().partition(|(k, _)| values.get(*k).is_some_and(Value::is_object));
    for (name, prop) in scalars {
        out.push(Entry {
            path: join(prefix, name),
            description: description(root, prop),
            default: Some(values.get(name).cloned().unwrap_or(Value::Null)),
        });
    }
    for (name, prop) in tables {
        let path = join(prefix, name);
        out.push(Entry { path: path.clone(), description: description(root, prop), default: None });
        walk(root, resolve(root, prop), &values[name], &path, out);
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn resolve<'a>(root: &'a Value, prop: &'a Value) -> &'a Value {
    let reference = prop
        .get("$ref")
        .or_else(|| prop.get("allOf").and_then(|a| a.get(0)).and_then(|r| r.get("$ref")))
        .and_then(Value::as_str);
    match reference.and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &root["$defs"][name],
        None => prop,
    }
}

fn description(root: &Value, prop: &Value) -> String {
    prop.get("description")
        .or_else(|| resolve(root, prop).get("description"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// The environment variable that sets a key.
pub fn env_name(path: &str) -> String {
    format!("HERALD_{}", path.replace('.', "__").to_ascii_uppercase())
}

fn wrap(text: &str, width: usize, prefix: &str) -> String {
    let mut out = String::new();
    for para in text.split("\n\n") {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && prefix.len() + line.len() + 1 + word.len() > width {
                out.push_str(prefix);
                out.push_str(&line);
                out.push('\n');
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            out.push_str(prefix);
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// The example configuration: every key, its default, and its documentation.
pub fn example_toml() -> String {
    let mut out = String::from(
        "# Herald configuration: every key with its default value.\n\
         # Generated from the source (crates/herald/src/config); do not edit by hand.\n\
         # Precedence, lowest first: defaults, this file (--config), HERALD_* environment\n\
         # variables (HERALD_WEBSOCKET__MAX_FRAME_SIZE=...), command-line flags.\n",
    );
    for e in entries() {
        out.push('\n');
        out.push_str(&wrap(&e.description, 94, "# "));
        match &e.default {
            Some(v) => {
                out.push_str(&format!("{} = {}\n", e.path.rsplit('.').next().unwrap_or(&e.path), toml_literal(v)))
            }
            None => out.push_str(&format!("[{}]\n", e.path)),
        }
    }
    out
}

/// The configuration reference for `docs/configuration.md`.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated from crates/herald/src/config by `UPDATE_GOLDEN=1 cargo test -p herald config`; do not edit. -->\n\n\
         Herald reads, in order of precedence (later wins):\n\n\
         1. built-in defaults (below),\n\
         2. a TOML file given with `--config FILE` (see `config/herald.example.toml`),\n\
         3. environment variables `HERALD_<SECTION>__<KEY>`, upper case, sections separated by `__`,\n\
         4. command-line flags (`--listen`).\n\n\
         Unknown keys in the file are errors, so a typo never goes unnoticed. A `HERALD_*`\n\
         environment variable that names no key is ignored with a warning in the log and in\n\
         `herald check-config` (`HERALD_API_KEY is not a Herald setting; ignored (did you mean\n\
         HERALD_API__KEY?)`); a known variable with a bad value is an error. The service links\n\
         Kubernetes injects for a Service named `herald` (`HERALD_PORT`, `HERALD_SERVICE_HOST`,\n\
         `HERALD_SERVICE_PORT*`, `HERALD_PORT_8080_TCP*`) and `HERALD_BIN` are ignored silently.\n\
         `herald check-config` prints the effective configuration and where each value came from.\n\
         Durations are written like `10s`, `1m 30s` or `250ms`; sizes are in bytes.\n",
    );
    for e in entries() {
        match &e.default {
            None => out.push_str(&format!("\n## `[{}]`\n\n{}\n", e.path, e.description)),
            Some(v) => out.push_str(&format!(
                "\n### `{}`\n\n{}\n\nDefault: `{}` · Environment: `{}`\n",
                e.path,
                e.description,
                toml_literal(v),
                env_name(&e.path)
            )),
        }
    }
    out
}

/// Every leaf key of the configuration, for tests.
pub fn keys() -> Vec<String> {
    let mut leaves = Vec::new();
    flatten("", &serde_json::to_value(Config::default()).unwrap_or_default(), &mut leaves);
    leaves.into_iter().map(|(k, _)| k).collect()
}
