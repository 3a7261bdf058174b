//! The deployment files at the repository root (`compose.yaml`, `Dockerfile`, `.dockerignore`)
//! and the nats-server configs in `nats/`: they name only files that exist, wire the services
//! together as DESIGN §10 and §12 say, and every config is accepted by the real nats-server.
//! No container runs here; these checks are what can be known without one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` interpolation, resolved as if no
/// variable were set: what `docker compose up` runs with out of the box.
fn with_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap_or_else(|| panic!("unclosed ${{ in {value:?}")) + start;
        let inner = &rest[start + 2..end];
        if let Some((_, default)) = inner.split_once(":-").or_else(|| inner.split_once('-')) {
            out.push_str(default);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A service's `environment`, in either of Compose's forms, with defaults interpolated.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let k = k.as_str().expect("environment keys are strings").to_owned();
                let v = match v {
                    Value::String(s) => with_defaults(s),
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
                (k.to_owned(), with_defaults(v))
            })
            .collect(),
        Some(other) => panic!("environment is neither a mapping nor a list: {other:?}"),
    }
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

        // It gets every password tenants.conf reads from the environment.
        let env = environment(svc);
        for var in &tenants_vars {
            assert!(env.contains_key(var), "{node} lacks {var}, which nats/tenants.conf needs");
        }

        // Its routes name the two other nodes on the cluster port, and not itself.
        let conf = read(&format!("nats/cluster-{}.conf", n + 1));
        let mut hosts: Vec<String> = routes(&conf)
            .iter()
            .map(|url| {
                let host_port = url.split("://").nth(1).unwrap_or_else(|| panic!("route {url} is not a URL"));
                let host_port = host_port.rsplit('@').next().unwrap();
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
    let nats_1_ports = format!("{:?}", service(&compose, "nats-1")["ports"]);
    assert!(nats_1_ports.contains("4222:4222"), "nats-1 publishes 4222: {nats_1_ports}");

    // The routers: built from the Dockerfile, started once Postgres and every NATS node are
    // healthy, configured per DESIGN §10 with the router user's password.
    let dev = dev_env();
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
        assert!(get("PICLOUD_DATABASE_URL").starts_with("postgres://"));
        assert!(get("PICLOUD_DATABASE_URL").contains("@postgres:5432/"));
        let nats_url = get("PICLOUD_NATS_URL");
        for node in NATS_NODES {
            assert!(
                nats_url.contains(&format!("nats://{node}:4222")),
                "{router}'s PICLOUD_NATS_URL: {nats_url}"
            );
        }
        assert_eq!(get("PICLOUD_NATS_USER"), "router");
        assert_eq!(
            Some(get("PICLOUD_NATS_PASSWORD")),
            dev.get("PICLOUD_NATS_ROUTER_PASSWORD"),
            "{router}'s default NATS password is the router user's of nats/dev.env"
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

    // The NATS nodes' default passwords are those of nats/dev.env (the routers' too, above).
    for node in NATS_NODES {
        let env = environment(service(&compose, node));
        for (k, v) in &dev {
            assert_eq!(env.get(k), Some(v), "{node}'s default {k} is that of nats/dev.env");
        }
    }
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
    for needed in ["Cargo.toml", "Cargo.lock", "crates", "migrations"] {
        assert!(repo_root().join(needed).exists(), "{needed} exists");
        assert!(
            !ignored.iter().any(|i| *i == needed || *i == "*" || *i == "**"),
            ".dockerignore drops {needed}"
        );
    }
    assert!(ignored.contains(&"target"), ".dockerignore keeps target/ out of the context");
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
