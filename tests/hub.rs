//! Hugging Face Hub names, against a local HTTP server that serves the tiny fixture model and
//! dataset the way the Hub does (`/api/{models,datasets}/<id>/revision/main` listings,
//! `/<id>/resolve/main/<file>` and `/datasets/<id>/resolve/main/<file>` with ranges, ETag and
//! X-Repo-Commit), reached through `HF_ENDPOINT` with `HF_HOME` in a temporary directory:
//! the programs train/evaluate from Hub names exactly as from local paths, files land in the HF
//! cache layout, an interrupted download resumes from its partial blob, `HF_HUB_OFFLINE=1` and
//! an unreachable Hub use the cache, and unknown or unusable repositories give clear errors.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use moe_peft::hub::{Hub, HubError, RepoKind};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const MODEL: &str = "tiny-org/tiny-deepseek-moe";
const SHARDED: &str = "tiny-org/tiny-sharded";
const DATASET: &str = "tiny-org/tiny-instruct";

/// Files of one repository: name in the repository → bytes.
type Files = Vec<(String, Vec<u8>)>;

/// A minimal Hub: serves `repos` ("models"/"datasets", id) and records every request line with
/// its Range header.
struct FakeHub {
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<Mutex<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: HashMap<(String, String), Files>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(Mutex::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if *stop2.lock().unwrap() {
                    break;
                }
                if let Ok(s) = stream {
                    serve(s, &repos, &log2);
                }
            }
        });
        FakeHub {
            url,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn shut_down(&mut self) {
        *self.stop.lock().unwrap() = true;
        // Wake the accept loop.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn etag(bytes: &[u8]) -> String {
    // FNV-1a, 64 bits, twice with different seeds: unique enough for a handful of files.
    let h = |seed: u64| {
        bytes
            .iter()
            .fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
    };
    format!(
        "{:016x}{:016x}",
        h(0xcbf29ce484222325),
        h(0x84222325cbf29ce4)
    )
}

fn serve(mut s: TcpStream, repos: &HashMap<(String, String), Files>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push(format!(
        "{path} {}",
        range.clone().unwrap_or_else(|| "-".into())
    ));
    let reply = |s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body);
        let _ = s.flush();
    };
    let not_found = |s: &mut TcpStream| {
        reply(
            s,
            "404 Not Found",
            &[("X-Error-Code", "RepoNotFound".into())],
            b"{\"error\":\"Repository not found\"}",
        )
    };
    // Listing: /api/{models,datasets}/<owner>/<name>/revision/main
    if let Some(rest) = path.strip_prefix("/api/") {
        let (kind, rest) = rest.split_once('/').unwrap_or(("", ""));
        let id = rest.strip_suffix("/revision/main").unwrap_or("");
        match repos.get(&(kind.to_string(), id.to_string())) {
            Some(files) => {
                let siblings: Vec<serde_json::Value> = files
                    .iter()
                    .map(|(f, _)| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body = serde_json::json!({ "id": id, "sha": COMMIT, "siblings": siblings });
                reply(
                    &mut s,
                    "200 OK",
                    &[("Content-Type", "application/json".into())],
                    body.to_string().as_bytes(),
                );
            }
            None => not_found(&mut s),
        }
        return;
    }
    // Files: /<owner>/<name>/resolve/main/<file> or /datasets/<owner>/<name>/resolve/main/<file>
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("datasets", r),
        None => ("models", path.trim_start_matches('/')),
    };
    let Some((id, file)) = rest.split_once("/resolve/main/") else {
        return not_found(&mut s);
    };
    let Some(bytes) = repos
        .get(&(kind.to_string(), id.to_string()))
        .and_then(|files| files.iter().find(|(f, _)| f == file))
        .map(|(_, b)| b)
    else {
        return not_found(&mut s);
    };
    let common = vec![
        ("ETag", format!("\"{}\"", etag(bytes))),
        ("X-Repo-Commit", COMMIT.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let start: usize = a.parse().unwrap();
            let end: usize = if b.is_empty() {
                bytes.len().saturating_sub(1)
            } else {
                b.parse::<usize>().unwrap().min(bytes.len() - 1)
            };
            let mut headers = common;
            headers.push((
                "Content-Range",
                format!("bytes {start}-{end}/{}", bytes.len()),
            ));
            let body = if start < bytes.len() {
                &bytes[start..=end]
            } else {
                &[][..]
            };
            reply(&mut s, "206 Partial Content", &headers, body);
        }
        None => reply(&mut s, "200 OK", &common, bytes),
    }
    // Drain anything left so the client sees a clean close.
    let _ = reader.read(&mut [0u8; 1]);
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{p}")).unwrap()
}

/// The repositories served: the tiny model as one file (`MODEL`), `model_dir` (a sharded
/// checkpoint with its index and tokenizer) as `SHARDED`, the tiny dataset, and a model without
/// weights.
fn repos(model_dir: Option<&Path>) -> HashMap<(String, String), Files> {
    let mut m = HashMap::new();
    m.insert(
        ("models".to_string(), MODEL.to_string()),
        vec![
            (
                ".gitattributes".to_string(),
                b"*.safetensors filter=lfs\n".to_vec(),
            ),
            ("README.md".to_string(), b"# tiny\n".to_vec()),
            (
                "config.json".to_string(),
                read("tiny_deepseek_moe/config.json"),
            ),
            (
                "model.safetensors".to_string(),
                read("tiny_deepseek_moe/model.safetensors"),
            ),
        ],
    );
    if let Some(dir) = model_dir {
        let mut files: Files = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        files.push(("README.md".to_string(), b"# sharded\n".to_vec()));
        files.sort();
        m.insert(("models".to_string(), SHARDED.to_string()), files);
    }
    m.insert(
        ("datasets".to_string(), DATASET.to_string()),
        vec![
            ("README.md".to_string(), b"# data\n".to_vec()),
            (
                "data/train-00000-of-00001.parquet".to_string(),
                read("data/tiny_instruct.parquet"),
            ),
        ],
    );
    m.insert(
        ("models".to_string(), "tiny-org/no-weights".to_string()),
        vec![(
            "config.json".to_string(),
            read("tiny_deepseek_moe/config.json"),
        )],
    );
    m
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "{} is not built", p.display());
    p
}

fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(example(name));
    c.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn eval_loss(args: &[&str], env: &[(&str, &str)]) -> f64 {
    let o = run("evaluate", args, env);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "evaluate {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// A random tiny checkpoint (DeepSeek's vocabulary, so the DeepSeek tokenizer fits) in HF
/// layout: several shards, an index, the tokenizer files.
fn sharded_checkpoint(dir: &Path) {
    let o = run(
        "random-checkpoint",
        &[
            "--preset",
            "tiny",
            "--output_dir",
            dir.to_str().unwrap(),
            "--max_shard_size",
            "10MB",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn programs_take_hub_names_and_use_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let local_model = tmp.path().join("ck");
    sharded_checkpoint(&local_model);
    let local_model = local_model.to_str().unwrap().to_string();
    let mut hub = FakeHub::start(repos(Some(Path::new(&local_model))));
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let url = hub.url.clone();
    let env = [("HF_ENDPOINT", url.as_str()), ("HF_HOME", home_s)];
    let common = ["--model_max_length", "128", "--cpu"];

    let local_data = format!("{FIXTURES}/data/tiny_instruct.parquet");
    let local = eval_loss(
        &[
            &[
                "--model_name_or_path",
                &local_model,
                "--data_path",
                &local_data,
            ][..],
            &common,
        ]
        .concat(),
        &[],
    );
    let by_name = eval_loss(
        &[
            &["--model_name_or_path", SHARDED, "--data_path", DATASET][..],
            &common,
        ]
        .concat(),
        &env,
    );
    assert_eq!(local.to_bits(), by_name.to_bits(), "{local} vs {by_name}");

    // The huggingface_hub cache layout.
    let snap = home
        .path()
        .join("hub/models--tiny-org--tiny-sharded/snapshots")
        .join(COMMIT);
    let mut served: Vec<String> = std::fs::read_dir(&local_model)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    served.sort();
    assert!(
        served
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .count()
            >= 2,
        "{served:?}"
    );
    for f in &served {
        assert!(snap.join(f).is_file(), "{f} not in {}", snap.display());
    }
    assert!(
        !snap.join("README.md").exists(),
        "only the files a model needs are fetched"
    );
    let refs = home
        .path()
        .join("hub/models--tiny-org--tiny-sharded/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), COMMIT);
    assert!(home
        .path()
        .join("hub/datasets--tiny-org--tiny-instruct/snapshots")
        .join(COMMIT)
        .join("data/train-00000-of-00001.parquet")
        .is_file());

    // Training from Hub names records the model's name in the adapter, as PEFT does.
    let out = tempfile::tempdir().unwrap();
    let o = run(
        "qlora-train",
        &[
            "--model_name_or_path",
            SHARDED,
            "--data_path",
            DATASET,
            "--output_dir",
            out.path().to_str().unwrap(),
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--model_max_length",
            "64",
            "--save_strategy",
            "no",
            "--use_lora",
            "True",
            "--cpu",
        ],
        &env,
    );
    assert!(
        o.status.success(),
        "qlora-train from Hub names failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], SHARDED);

    // Offline: the cache alone, with the server gone.
    hub.shut_down();
    let offline = eval_loss(
        &[
            &["--model_name_or_path", SHARDED, "--data_path", DATASET][..],
            &common,
        ]
        .concat(),
        &[env[0], env[1], ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(offline.to_bits(), local.to_bits());
    // Online but unreachable: the complete cached copy is used, as huggingface_hub does.
    let unreachable = eval_loss(
        &[
            &["--model_name_or_path", SHARDED, "--data_path", DATASET][..],
            &common,
        ]
        .concat(),
        &env,
    );
    assert_eq!(unreachable.to_bits(), local.to_bits());
    // Offline without a cached copy: a clear error naming the missing file.
    let other_home = tempfile::tempdir().unwrap();
    let o = run(
        "evaluate",
        &[
            &["--model_name_or_path", SHARDED, "--data_path", &local_data][..],
            &common,
        ]
        .concat(),
        &[
            ("HF_HOME", other_home.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("HF_HUB_OFFLINE is set") && err.contains(SHARDED) && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn unknown_and_unusable_repositories_give_clear_errors() {
    let hub = FakeHub::start(repos(None));
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HOME", home.path().to_str().unwrap()),
    ];
    let data = format!("{FIXTURES}/data/tiny_instruct.parquet");
    for (model, needle) in [
        ("tiny-org/missing", "HTTP 404"),
        ("tiny-org/no-weights", "no safetensors weights"),
    ] {
        let o = run(
            "evaluate",
            &["--model_name_or_path", model, "--data_path", &data, "--cpu"],
            &env,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{model} should fail");
        assert!(
            err.contains(needle) && err.contains(model) && err.contains("--model_name_or_path"),
            "{model}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = run(
        "evaluate",
        &[
            "--model_name_or_path",
            &format!("{FIXTURES}/tiny_deepseek_moe"),
            "--data_path",
            "tiny-org/no-such-data",
            "--cpu",
        ],
        &env,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--data_path tiny-org/no-such-data") && err.contains("HTTP 404"),
        "{err}"
    );
}

#[test]
fn an_interrupted_download_resumes_from_its_partial_blob() {
    let hub = FakeHub::start(repos(None));
    let cache = tempfile::tempdir().unwrap();
    let weights = read("tiny_deepseek_moe/model.safetensors");
    // What an interrupted earlier run leaves: the first part of the blob, named by its ETag.
    let blobs = cache
        .path()
        .join("models--tiny-org--tiny-deepseek-moe/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let cut = weights.len() / 3;
    std::fs::write(
        blobs.join(format!("{}.part", etag(&weights))),
        &weights[..cut],
    )
    .unwrap();

    let h = Hub::new(cache.path(), &hub.url).with_progress(false);
    let dir = h
        .dir(RepoKind::Model, "--model_name_or_path", MODEL)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
    let asked: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains("model.safetensors"))
        .collect();
    assert!(
        asked.iter().any(|r| r.ends_with(&format!("bytes={cut}-"))),
        "no request resumed at byte {cut}: {asked:?}"
    );
    assert!(
        !asked.iter().any(|r| r.ends_with("bytes=0-")),
        "the file was fetched from the start: {asked:?}"
    );

    // Local paths are never looked up, and a name that is neither is refused without a request.
    let before = hub.requests().len();
    let local = format!("{FIXTURES}/tiny_deepseek_moe");
    assert_eq!(
        h.dir(RepoKind::Model, "--model_name_or_path", &local)
            .unwrap(),
        PathBuf::from(&local)
    );
    assert!(matches!(
        h.data_files("--data_path", "/nonexistent/data.parquet"),
        Err(HubError::NotFound { .. })
    ));
    assert_eq!(hub.requests().len(), before);
}
