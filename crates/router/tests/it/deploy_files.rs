//! The deployment files at the repository root (`compose.yaml`, `Dockerfile`, `.dockerignore`)
//! and the nats-server configs in `nats/`: they name only files that exist, wire the services
//! together as DESIGN §10 and §12 say, have no default secrets, and every config is accepted by
//! the real nats-server, with limits that fit what a router sends. No container runs here; these
//! checks are what can be known without one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_norway::Value;

const NATS_NODES: [&str; 3] = ["nats-1", "nats-2", "nats-3"];
const ROUTERS: [&str; 2] = ["router-1", "router-2"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `compose.yaml`, with its YAML merge keys (`<<: *anchor`) applied as Compose applies them.
fn compose() -> Value {
    let mut compose: Value = serde_norway::from_str(&read("compose.yaml")).expect("compose.yaml is YAML");
    compose.apply_merge().expect("compose.yaml's merge keys apply");
    compose
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"].get(name).unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
}

/// The secrets `compose.yaml` needs, as an operator would set them (none of nats/dev.env's):
/// the database's, the token secret, the routes' and every password `nats/tenants.conf` reads.
fn operator_secrets() -> BTreeMap<String, String> {
    ["POSTGRES_PASSWORD", "PICLOUD_TOKEN_SECRET", "PICLOUD_NATS_ROUTE_PASSWORD"]
        .into_iter()
        .map(str::to_owned)
        .chain(variables(&read("nats/tenants.conf")))
        .map(|name| {
            let value = format!("{}-0123456789abcdef", name.to_lowercase());
            (name, value)
        })
        .collect()
}

/// One `${…}` of a Compose file: the variable, how it is referred to (`:-`, `-`, `:?`, `?` or
/// nothing) and the text after that.
struct Reference<'a> {
    variable: &'a str,
    form: &'a str,
    text: &'a str,
}

/// The `${…}` references in `value`, with their byte range.
fn references(value: &str) -> Vec<(usize, usize, Reference<'_>)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(start) = value[from..].find("${").map(|i| i + from) {
        let end = value[start..].find('}').unwrap_or_else(|| panic!("unclosed ${{ in {value:?}")) + start;
        let inner = &value[start + 2..end];
        let name_end = inner.find(|c: char| !c.is_ascii_alphanumeric() && c != '_').unwrap_or(inner.len());
        let (variable, rest) = inner.split_at(name_end);
        let form = [":?", "?", ":-", "-"].into_iter().find(|f| rest.starts_with(f)).unwrap_or_else(|| {
            assert!(rest.is_empty(), "unknown interpolation ${{{inner}}} in {value:?}");
            ""
        });
        found.push((start, end + 1, Reference { variable, form, text: &rest[form.len()..] }));
        from = end + 1;
    }
    found
}

/// Compose's interpolation of `value` with the variables `set`: `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, and `${VAR:?message}` / `${VAR?message}`, which refuse an unset variable
/// (the error is compose's message).
fn interpolate(value: &str, set: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut at = 0;
    for (start, end, reference) in references(value) {
        out.push_str(&value[at..start]);
        let current =
            set.get(reference.variable).filter(|v| !v.is_empty() || !reference.form.starts_with(':'));
        match (current, reference.form) {
            (Some(v), _) => out.push_str(v),
            (None, ":-" | "-") => out.push_str(reference.text),
            (None, ":?" | "?") => {
                return Err(format!(
                    "required variable {} is missing a value: {}",
                    reference.variable, reference.text
                ));
            }
            (None, _) => {}
        }
        at = end;
    }
    out.push_str(&value[at..]);
    Ok(out)
}

/// A service's `environment`, in either of Compose's forms, uninterpolated.
fn raw_environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let k = k.as_str().expect("environment keys are strings").to_owned();
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => String::new(),
                    other => panic!("environment value of {k} is not a scalar: {other:?}"),
                };
                (k, v)
            })
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|item| {
                let item = item.as_str().expect("environment items are strings");
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("environment is neither a mapping nor a list: {other:?}"),
    }
}

/// A service's `environment`, interpolated with the operator's secrets.
fn environment(service: &Value) -> BTreeMap<String, String> {
    let secrets = operator_secrets();
    raw_environment(service)
        .into_iter()
        .map(|(k, v)| {
            let v = interpolate(&v, &secrets).unwrap_or_else(|e| panic!("{k}: {e}"));
            (k, v)
        })
        .collect()
}

/// The `(host path, container path)` of a service's bind mounts; named volumes are skipped.
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    let Some(volumes) = service.get("volumes") else { return Vec::new() };
    let volumes = volumes.as_sequence().expect("volumes is a list");
    volumes
        .iter()
        .filter_map(|volume| match volume {
            Value::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap();
                let target = parts.next().unwrap_or(source);
                let is_path = source.starts_with('.') || source.starts_with('/') || source.starts_with('~');
                is_path.then(|| (source.to_owned(), target.to_owned()))
            }
            Value::Mapping(_) => (volume["type"].as_str() == Some("bind")).then(|| {
                let source = volume["source"].as_str().expect("a bind mount has a source");
                let target = volume["target"].as_str().expect("a bind mount has a target");
                (source.to_owned(), target.to_owned())
            }),
            other => panic!("a volume is neither a string nor a mapping: {other:?}"),
        })
        .collect()
}

/// `nats-route://host:port` URLs in the `routes` list of a nats-server config.
fn routes(conf: &str) -> Vec<String> {
    let code: String = conf.lines().map(|l| l.split('#').next().unwrap()).collect::<Vec<_>>().join("\n");
    let start = code.find("routes").expect("the config has `routes`");
    let open = code[start..].find('[').expect("routes is a list") + start;
    let close = code[open..].find(']').expect("routes list is closed") + open;
    code[open + 1..close]
        .split(|c: char| c.is_whitespace() || c == ',')
        .map(|s| s.trim_matches('"'))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The variables of `nats/dev.env`.
fn dev_env() -> BTreeMap<String, String> {
    picloud_testkit::parse_env_file(&read("nats/dev.env"))
}

/// The `$VARIABLES` a nats-server config refers to.
fn variables(conf: &str) -> BTreeSet<String> {
    conf.lines()
        .map(|l| l.split('#').next().unwrap())
        .flat_map(|l| l.match_indices('$').map(move |(i, _)| &l[i + 1..]))
        .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn compose_names_only_files_that_exist_and_every_service_is_wired() {
    let root = repo_root();
    let compose = compose();
    let services = compose["services"].as_mapping().expect("compose.yaml has services");
    for name in ["postgres", "nats-1", "nats-2", "nats-3", "router-1", "router-2"] {
        service(&compose, name);
    }

    // Every file it mounts or builds from exists.
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        for (source, _) in bind_mounts(svc) {
            let path = root.join(&source);
            assert!(path.exists(), "service {name} mounts {source}, which does not exist");
        }
        match svc.get("build") {
            None => {}
            Some(Value::String(context)) => {
                let context = root.join(context);
                assert!(context.is_dir(), "service {name}: build context {} is not a dir", context.display());
                assert!(context.join("Dockerfile").is_file(), "service {name}: no Dockerfile in its context");
            }
            Some(build) => {
                let context = root.join(build["context"].as_str().unwrap_or("."));
                assert!(context.is_dir(), "service {name}: build context {} is not a dir", context.display());
                let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
                assert!(dockerfile.is_file(), "service {name}: {} does not exist", dockerfile.display());
            }
        }
        if let Some(files) = svc.get("env_file") {
            let files: Vec<&str> = match files {
                Value::String(f) => vec![f],
                Value::Sequence(fs) => {
                    fs.iter().map(|f| f.as_str().unwrap_or_else(|| f["path"].as_str().unwrap())).collect()
                }
                other => panic!("service {name}: env_file is {other:?}"),
            };
            for file in files {
                assert!(root.join(file).is_file(), "service {name}: env_file {file} does not exist");
            }
        }
    }

    // Postgres and each NATS node say when they are healthy; NATS on its monitoring port.
    let postgres = service(&compose, "postgres");
    assert!(postgres["image"].as_str().unwrap().starts_with("postgres:"));
    let pg_check = format!("{:?}", postgres["healthcheck"]["test"]);
    assert!(pg_check.contains("pg_isready"), "postgres healthcheck: {pg_check}");

    let tenants_vars = variables(&read("nats/tenants.conf"));
    for (n, node) in NATS_NODES.iter().enumerate() {
        let svc = service(&compose, node);
        assert!(svc["image"].as_str().unwrap().starts_with("nats:"), "{node} runs nats");
        let check = format!("{:?}", svc["healthcheck"]["test"]);
        assert!(check.contains(":8222/healthz"), "{node} healthcheck: {check}");

        // Its own cluster config and the shared tenants file, read-only, side by side (the
        // config includes "tenants.conf" relative to itself), and the command runs that config.
        let own = format!("./nats/cluster-{}.conf", n + 1);
        let mounts = bind_mounts(svc);
        let (_, conf_target) = mounts
            .iter()
            .find(|(source, _)| *source == own)
            .unwrap_or_else(|| panic!("{node} does not mount {own}: {mounts:?}"));
        let conf_dir = Path::new(conf_target).parent().unwrap();
        assert!(
            mounts.iter().any(|(source, target)| source == "./nats/tenants.conf"
                && Path::new(target) == conf_dir.join("tenants.conf")),
            "{node} must mount ./nats/tenants.conf next to its config in {}: {mounts:?}",
            conf_dir.display()
        );
        let volumes = format!("{:?}", svc["volumes"]);
        assert_eq!(volumes.matches(":ro").count(), mounts.len(), "{node} mounts its configs read-only");
        let command = format!("{:?}", svc["command"]);
        assert!(command.contains(conf_target.as_str()), "{node} runs {conf_target}: {command}");

        // It gets every variable its config and tenants.conf read from the environment.
        let conf = read(&format!("nats/cluster-{}.conf", n + 1));
        let env = environment(svc);
        for var in tenants_vars.iter().chain(&variables(&conf)) {
            assert!(env.contains_key(var), "{node} lacks {var}, which its config needs");
        }

        // Its routes name the two other nodes on the cluster port, and not itself, and log in
        // as the user the cluster's authorization accepts, with its password.
        assert!(conf.contains("user: route"), "{node}'s cluster takes routes of user `route`");
        assert!(
            conf.contains("password: $PICLOUD_NATS_ROUTE_PASSWORD"),
            "{node}'s cluster takes the password of PICLOUD_NATS_ROUTE_PASSWORD"
        );
        let route_login = format!("route:{}@", env["PICLOUD_NATS_ROUTE_PASSWORD"]);
        let mut hosts: Vec<String> = routes(&conf)
            .iter()
            .map(|route| {
                let variable = route
                    .strip_prefix('$')
                    .unwrap_or_else(|| panic!("{node}: route {route} is not a variable"));
                let url = &env[variable];
                let rest =
                    url.strip_prefix("nats-route://").unwrap_or_else(|| panic!("route {url} is not a URL"));
                let host_port = rest
                    .strip_prefix(&route_login)
                    .unwrap_or_else(|| panic!("{node}: route {url} does not log in as route"));
                assert!(host_port.ends_with(":6222"), "{node}: route {url} is not on port 6222");
                host_port.trim_end_matches(":6222").to_owned()
            })
            .collect();
        hosts.sort();
        let others: Vec<String> =
            NATS_NODES.iter().filter(|other| *other != node).map(|s| (*s).to_owned()).collect();
        assert_eq!(hosts, others, "{node}'s routes");
        assert!(conf.contains("name: picloud"), "{node} is in the cluster `picloud`");
        assert!(conf.contains("include \"tenants.conf\""), "{node} includes the tenant permissions");
    }
    // Only the client port app workers need is published: nats-1's 4222.
    for node in NATS_NODES {
        let published: Vec<&str> = service(&compose, node)
            .get("ports")
            .map(|ports| {
                ports.as_sequence().expect("ports is a list").iter().map(|p| p.as_str().unwrap()).collect()
            })
            .unwrap_or_default();
        let expected: &[&str] = if node == "nats-1" { &["4222:4222"] } else { &[] };
        assert_eq!(published, expected, "{node} publishes only what app workers need");
    }

    // The routers: built from the Dockerfile, started once Postgres and every NATS node are
    // healthy, configured per DESIGN §10 with the router user's password.
    let nats_env = environment(service(&compose, "nats-1"));
    let postgres_env = environment(postgres);
    let mut node_ids = BTreeSet::new();
    for router in ROUTERS {
        let svc = service(&compose, router);
        assert!(svc.get("build").is_some(), "{router} is built from the Dockerfile");
        let depends = svc["depends_on"].as_mapping().unwrap_or_else(|| panic!("{router} depends_on"));
        for dependency in ["postgres", "nats-1", "nats-2", "nats-3"] {
            let condition = depends.get(dependency).and_then(|d| d["condition"].as_str());
            assert_eq!(condition, Some("service_healthy"), "{router} waits for {dependency} to be healthy");
            assert!(
                service(&compose, dependency).get("healthcheck").is_some(),
                "{dependency} has a healthcheck"
            );
        }
        let check = format!("{:?}", svc["healthcheck"]["test"]);
        assert!(check.contains(":8080/healthz"), "{router} healthcheck: {check}");

        let env = environment(svc);
        let get = |k: &str| env.get(k).unwrap_or_else(|| panic!("{router} lacks {k}"));
        assert_eq!(
            get("PICLOUD_DATABASE_URL"),
            &format!("postgres://picloud:{}@postgres:5432/picloud", postgres_env["POSTGRES_PASSWORD"]),
            "{router} logs in to Postgres with its password"
        );
        let nats_url = get("PICLOUD_NATS_URL");
        for node in NATS_NODES {
            assert!(
                nats_url.contains(&format!("nats://{node}:4222")),
                "{router}'s PICLOUD_NATS_URL: {nats_url}"
            );
        }
        assert_eq!(get("PICLOUD_NATS_USER"), "router");
        assert_eq!(
            get("PICLOUD_NATS_PASSWORD"),
            &nats_env["PICLOUD_NATS_ROUTER_PASSWORD"],
            "{router}'s NATS password is the router user's of the NATS nodes"
        );
        assert!(get("PICLOUD_TOKEN_SECRET").len() >= 16, "PICLOUD_TOKEN_SECRET needs 16 bytes");
        assert_eq!(get("PICLOUD_HTTP_ADDR"), "0.0.0.0:8080");
        assert!(
            node_ids.insert(get("PICLOUD_NODE_ID").clone()),
            "{router}'s PICLOUD_NODE_ID is not distinct"
        );
    }
    let router_1_ports = format!("{:?}", service(&compose, "router-1")["ports"]);
    assert!(router_1_ports.contains("8080:8080"), "router-1 publishes 8080: {router_1_ports}");
}

#[test]
fn the_dockerfile_builds_the_router_from_a_context_that_has_its_sources() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("FROM rust:1-bookworm AS build"), "builds with the Rust image");
    assert!(dockerfile.contains("-p picloud-router"), "builds the router binary");
    assert!(dockerfile.contains("FROM debian:bookworm-slim"), "runs on Debian slim");
    assert!(dockerfile.contains("ENTRYPOINT [\"picloud-router\"]"));
    assert!(dockerfile.contains("CMD [\"serve\", \"--migrate\"]"));
    let user = dockerfile.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("the image sets a USER");
    assert!(!user.starts_with("root") && !user.starts_with('0'), "runs as a non-root user, not {user}");
    // The healthcheck's program is installed in the runtime image.
    let compose = compose();
    let check = service(&compose, "router-1")["healthcheck"]["test"].clone();
    let program = check[1].as_str().unwrap();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.contains("apt-get install") && l.split_whitespace().any(|w| w == program)),
        "the router healthcheck runs {program}, which the Dockerfile does not install"
    );

    // What the build needs is not ignored.
    let dockerignore = read(".dockerignore");
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("./").trim_end_matches('/'))
        .collect();
    for needed in build_inputs() {
        assert!(repo_root().join(&needed).exists(), "{needed} exists");
        assert!(
            !ignored.iter().any(|i| *i == needed || *i == "*" || *i == "**"),
            ".dockerignore drops {needed}"
        );
    }
    assert!(ignored.contains(&"target"), ".dockerignore keeps target/ out of the context");
}

/// The top-level entries of the repository a release build reads: the manifests, the
/// migrations (`sqlx::migrate!`), every workspace member's directory, and every file the sources
/// include with `include_str!` or `include_bytes!`.
fn build_inputs() -> BTreeSet<String> {
    let root = repo_root();
    let mut inputs: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "migrations"].map(str::to_owned).into();
    let manifest = read("Cargo.toml");
    let members =
        manifest.lines().find_map(|l| l.trim().strip_prefix("members = [")).expect("workspace members");
    inputs.extend(members.split('"').skip(1).step_by(2).map(|member| top_level(Path::new(member))));
    let mut sources: Vec<PathBuf> = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .map(|crate_dir| crate_dir.path().join("src"))
        .collect();
    dirs.push(root.join("examples"));
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push(path);
            }
        }
    }
    for source in sources {
        let text = std::fs::read_to_string(&source).unwrap();
        for macro_call in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(macro_call) {
                let rest = &text[at + macro_call.len()..];
                let included = source.parent().unwrap().join(&rest[..rest.find('"').unwrap()]);
                let included =
                    included.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", included.display()));
                inputs.insert(top_level(included.strip_prefix(&root).expect("inside the repository")));
            }
        }
    }
    inputs
}

/// The first component of a path inside the repository.
fn top_level(path: &Path) -> String {
    path.components().next().unwrap().as_os_str().to_string_lossy().into_owned()
}

/// nats-server: on `PATH`, else where Debian and the official builds put it.
fn nats_server() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .expect("nats-server is installed (apt-get install nats-server)")
}

/// `nats-server -c <conf> -t` (check the config and exit) with exactly `env` as environment.
fn check_config(conf: &Path, env: &BTreeMap<String, String>) -> std::process::Output {
    Command::new(nats_server())
        .arg("-c")
        .arg(conf)
        .arg("-t")
        .env_clear()
        .envs(env)
        .output()
        .expect("run nats-server")
}

#[test]
fn every_nats_config_is_accepted_by_nats_server_with_the_environment_it_is_given() {
    let root = repo_root();
    let compose = compose();
    let mut confs: Vec<PathBuf> = std::fs::read_dir(root.join("nats"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    confs.sort();
    let names: Vec<String> =
        confs.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["cluster-1.conf", "cluster-2.conf", "cluster-3.conf", "dev.conf", "tenants.conf"] {
        assert!(names.iter().any(|n| n == expected), "nats/{expected} exists; have {names:?}");
    }

    for conf in &confs {
        let name = conf.file_name().unwrap().to_string_lossy().into_owned();
        // A cluster node's config runs with its compose service's environment; the others with
        // the development passwords they document.
        let env = match name.strip_prefix("cluster-").and_then(|n| n.strip_suffix(".conf")) {
            Some(n) => environment(service(&compose, &format!("nats-{n}"))),
            None => dev_env(),
        };
        let out = check_config(conf, &env);
        assert!(
            out.status.success(),
            "nats-server rejects nats/{name}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The check is real: without the passwords the same files are refused, naming the variable.
    let out = check_config(&root.join("nats/tenants.conf"), &BTreeMap::new());
    assert!(!out.status.success(), "tenants.conf must not start without its passwords");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PICLOUD_NATS_"), "the error names the missing variable: {stderr}");
}

/// Every string in a YAML document.
fn strings(value: &Value) -> Vec<&str> {
    match value {
        Value::String(s) => vec![s.as_str()],
        Value::Sequence(items) => items.iter().flat_map(strings).collect(),
        Value::Mapping(map) => map.iter().flat_map(|(k, v)| [strings(k), strings(v)].concat()).collect(),
        Value::Tagged(tagged) => strings(&tagged.value),
        _ => Vec::new(),
    }
}

/// Whether a variable's name says it holds a secret.
fn is_secret(variable: &str) -> bool {
    ["PASSWORD", "SECRET", "TOKEN", "CREDS"].iter().any(|word| variable.contains(word))
}

#[test]
fn compose_has_no_default_secret_and_refuses_to_start_without_each_one_naming_it() {
    let compose = compose();
    let text = read("compose.yaml");

    // Every secret is required (`${VAR:?set VAR: …}`), never defaulted.
    let mut required = BTreeSet::new();
    for value in strings(&compose) {
        for (_, _, reference) in references(value) {
            if is_secret(reference.variable) {
                assert_eq!(reference.form, ":?", "{} must be required: {value:?}", reference.variable);
                assert!(
                    reference.text.starts_with(&format!("set {}:", reference.variable)),
                    "the refusal says what to set: {value:?}"
                );
                required.insert(reference.variable.to_owned());
            }
        }
    }
    let expected: BTreeSet<String> = operator_secrets().into_keys().collect();
    assert_eq!(required, expected, "the secrets compose requires");

    // No service has a secret of its own: each comes from one of those variables.
    let services = compose["services"].as_mapping().unwrap();
    for (name, svc) in services {
        for (key, value) in raw_environment(svc) {
            if is_secret(&key) {
                assert!(
                    references(&value).iter().any(|(_, _, r)| r.form == ":?"),
                    "{name:?}'s {key} is not taken from a required variable: {value:?}"
                );
            }
        }
    }

    // Out of the box, every service that needs a secret refuses, naming it.
    let none = BTreeMap::new();
    for name in ["postgres", "nats-1", "router-1"] {
        let refusals: Vec<String> = raw_environment(service(&compose, name))
            .values()
            .filter_map(|v| interpolate(v, &none).err())
            .collect();
        assert!(!refusals.is_empty(), "{name} starts without any secret set");
        for refusal in &refusals {
            assert!(refusal.contains("is missing a value: set "), "{refusal}");
        }
    }

    // And the development values are nowhere in it.
    for (variable, value) in dev_env() {
        assert!(!text.contains(&value), "compose.yaml holds {variable}'s development value");
    }
    assert!(!text.contains("dev-only-token-secret"), "compose.yaml holds the old development token secret");
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `INFO` line a nats-server on `port` greets a client with, as JSON; waits for the server
/// to listen.
fn info(port: u16, log: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            let json = line.strip_prefix("INFO ").unwrap_or_else(|| panic!("not an INFO line: {line:?}"));
            return serde_json::from_str(json.trim()).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "nats-server did not listen on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn every_shipped_nats_config_has_a_max_payload_that_carries_the_largest_envelope_by_default() {
    let default =
        picloud_api::ApiConfig::new(picloud_dispatch::NodeConfig::new("n", &[0; 16])).max_payload_bytes;
    let largest = picloud_core::protocol::largest_envelope_bytes(default);
    let compose = compose();
    let dir = tempfile::tempdir().unwrap();
    for name in ["dev.conf", "cluster-1.conf", "cluster-2.conf", "cluster-3.conf"] {
        // The config as shipped, on free ports; a cluster node's routes lead nowhere.
        let (client, cluster) = (free_port(), free_port());
        let mut env = match name.strip_prefix("cluster-").and_then(|n| n.strip_suffix(".conf")) {
            Some(n) => environment(service(&compose, &format!("nats-{n}"))),
            None => dev_env(),
        };
        for route in
            env.keys().filter(|k| k.starts_with("PICLOUD_NATS_ROUTE_NATS_")).cloned().collect::<Vec<_>>()
        {
            env.insert(route, format!("nats-route://route:x@127.0.0.1:{}", free_port()));
        }
        let log = dir.path().join(format!("{name}.log"));
        let mut cmd = Command::new(nats_server());
        cmd.arg("-c").arg(repo_root().join("nats").join(name));
        cmd.args(["-a", "127.0.0.1", "-p", &client.to_string(), "-m", &free_port().to_string()]);
        if name.starts_with("cluster-") {
            cmd.args(["--cluster", &format!("nats://127.0.0.1:{cluster}")]);
        }
        cmd.env_clear().envs(&env).stdout(std::process::Stdio::null());
        cmd.stderr(std::fs::File::create(&log).unwrap());
        let mut server = picloud_testkit::spawn_tied(cmd).await.expect("start nats-server");

        let max_payload = info(client, &log)["max_payload"].as_u64().expect("INFO has max_payload");
        server.kill().unwrap();
        server.wait().unwrap();
        assert_eq!(max_payload, 3 * 1024 * 1024, "nats/{name}: `max_payload: 3MB` is 3 MiB");
        assert!(
            largest as u64 <= max_payload,
            "nats/{name}: max_payload {max_payload} cannot carry the largest envelope ({largest} bytes) of PICLOUD_MAX_PAYLOAD_BYTES={default}"
        );
    }
}

/// A Go duration as nats-server reads `expires`: `1h`, `10m`, `90s`, `1h30m`, `500ms`.
fn go_duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits =
            rest.find(|c: char| !c.is_ascii_digit()).unwrap_or_else(|| panic!("{text:?} lacks a unit"));
        let number: u64 = rest[..digits].parse().unwrap_or_else(|_| panic!("{text:?} is not a duration"));
        rest = &rest[digits..];
        let unit = ["ms", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u))
            .unwrap_or_else(|| panic!("{text:?}"));
        rest = &rest[unit.len()..];
        total += match unit {
            "ms" => Duration::from_millis(number),
            "h" => Duration::from_secs(number * 3600),
            "m" => Duration::from_secs(number * 60),
            _ => Duration::from_secs(number),
        };
    }
    total
}

#[test]
fn the_router_may_answer_a_request_for_the_longest_handler_timeout_and_apps_answer_by_subject_only() {
    let tenants = read("nats/tenants.conf");
    let code = tenants.lines().map(|l| l.split('#').next().unwrap()).collect::<Vec<_>>().join("\n");
    let users: Vec<&str> = code.split("user:").skip(1).collect();
    assert!(users.len() >= 3, "router, app-demo and app-shop");
    let longest = Duration::from_millis(picloud_dispatch::MAX_HANDLER_TIMEOUT_MS);
    for user in users {
        let name = user.split_whitespace().next().unwrap();
        let expires = user
            .split("expires:")
            .nth(1)
            .map(|v| go_duration(v.split('}').next().unwrap().trim().trim_matches('"')));
        match name.strip_prefix("app-") {
            None => {
                assert_eq!(name, "router");
                let expiry = expires.expect("the router has allow_responses with an expiry");
                assert!(
                    expiry >= longest,
                    "allow_responses expires after {expiry:?}, before the longest handler timeout {longest:?}"
                );
            }
            Some(slug) => {
                assert_eq!(expires, None, "{name} has allow_responses");
                assert!(!user.contains("allow_responses"), "{name} has allow_responses");
                let answers = format!("\"_INBOX.*.{slug}.*\"");
                assert!(user.contains(&answers), "{name} may not publish its answers on {answers}");
            }
        }
    }
}
