//! The Hub download path, for real, against a local server that speaks the Hub's
//! `/{repo}/resolve/{revision}/{file}` protocol on 127.0.0.1.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tuwen::LoadOptions;

use crate::common::{fixture, get, load_st};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` (`{repo}/{name}` -> bytes) until `stop` is set. Counts requests.
fn serve(
    files: HashMap<String, Vec<u8>>,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
) -> (String, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = format!(
        "http://{}",
        server.server_addr().to_ip().expect("ip address")
    );
    let handle = std::thread::spawn(move || {
        // Bounded: the loop ends when told to, or after two minutes at most.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            hits.fetch_add(1, Ordering::SeqCst);
            let url = req.url().to_string();
            let key = url
                .strip_prefix('/')
                .and_then(|u| u.split_once("/resolve/main/"))
                .map(|(repo, name)| format!("{repo}/{name}"));
            let Some(body) = key.and_then(|k| files.get(&k)) else {
                let _ = req
                    .respond(tiny_http::Response::from_string("not found").with_status_code(404));
                continue;
            };
            let range = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Range"))
                .map(|h| h.value.as_str().to_string());
            let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                Some(r) => {
                    let (a, b) = r.split_once('-').unwrap_or((r, ""));
                    let a: usize = a.parse().unwrap_or(0);
                    let b: usize = if b.is_empty() {
                        body.len() - 1
                    } else {
                        b.parse().unwrap_or(body.len() - 1)
                    };
                    (a, b.min(body.len() - 1))
                }
                None => (0, body.len() - 1),
            };
            let etag = format!(
                "\"{:016x}{:08x}\"",
                body.len(),
                body.iter().map(|&b| b as u32).sum::<u32>()
            );
            let headers = [
                ("ETag", etag),
                ("X-Repo-Commit", COMMIT.to_string()),
                (
                    "Content-Range",
                    format!("bytes {start}-{end}/{}", body.len()),
                ),
            ];
            let mut resp =
                tiny_http::Response::from_data(body[start..=end].to_vec()).with_status_code(206);
            for (k, v) in headers {
                resp.add_header(
                    tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("header"),
                );
            }
            let _ = req.respond(resp);
        }
    });
    (addr, handle)
}

#[test]
fn preset_download_then_offline_from_cache() {
    let repo = "google/siglip2-base-patch16-224";
    let mut files = HashMap::new();
    for f in ["config.json", "model.safetensors"] {
        files.insert(
            format!("{repo}/{f}"),
            std::fs::read(fixture(&format!("siglip2/siglip_tiny/{f}"))).unwrap(),
        );
    }
    // Chinese-CLIP RN50: the checkpoint and the vocabulary live in two repositories.
    let (rn50_repo, vocab_repo) = (
        "OFA-Sys/chinese-clip-rn50",
        tuwen::models::cnclip::VOCAB_REPO,
    );
    let rn50_pt = std::fs::read(fixture("cnclip/cn_clip_rn50_tiny.pt")).unwrap();
    files.insert(format!("{rn50_repo}/clip_cn_rn50.pt"), rn50_pt.clone());
    files.insert(
        format!("{vocab_repo}/vocab.txt"),
        std::fs::read(fixture("cnclip/vit_tiny/vocab.txt")).unwrap(),
    );
    files.insert(
        format!("{repo}/tokenizer.json"),
        std::fs::read(fixture("siglip2/tokenizer/tokenizer.json")).unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let (endpoint, handle) = serve(files, stop.clone(), hits.clone());
    let home = tempfile::tempdir().unwrap();

    // This is the only test that touches these variables.
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", home.path());
    std::env::remove_var("HF_HUB_OFFLINE");

    let first = tuwen::load("siglip2-base-patch16-224", &LoadOptions::default())
        .expect("download and load");
    assert!(hits.load(Ordering::SeqCst) > 0, "the server was used");
    let cached: Vec<PathBuf> = walk(home.path());
    assert!(
        cached.iter().any(|p| p.ends_with("model.safetensors")),
        "weights are in the cache: {cached:?}"
    );

    // The RN50 preset fetches its checkpoint and the ViT-B/16 vocabulary, then checks the
    // weights against the full-size preset configuration: the tiny checkpoint is refused
    // with a shape error that names a tensor.
    let (pt, vocab) = tuwen::models::cnclip::download_rn50().expect("RN50 files");
    assert_eq!(std::fs::read(&pt).unwrap(), rn50_pt);
    assert!(std::fs::read_to_string(&vocab)
        .unwrap()
        .starts_with("[PAD]"));
    let err = match tuwen::load("chinese-clip-rn50", &LoadOptions::default()) {
        Ok(_) => panic!("the tiny checkpoint passed for the full-size RN50"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("clip_cn_rn50.pt") && err.contains("shape"),
        "{err}"
    );

    // Stop the server; a second load works offline from the cache.
    stop.store(true, Ordering::SeqCst);
    handle.join().unwrap();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let before = hits.load(Ordering::SeqCst);
    let second =
        tuwen::load("siglip2-base-patch16-224", &LoadOptions::default()).expect("load from cache");
    assert_eq!(hits.load(Ordering::SeqCst), before);

    let io = load_st(&fixture("siglip2/siglip_tiny_io.safetensors"));
    let _ = get(&io, "image_embeds");
    let a = first.embed_texts(&["一张猫的照片。"]).unwrap();
    let b = second.embed_texts(&["一张猫的照片。"]).unwrap();
    crate::common::assert_close("downloaded vs cached", &a, &b, 0.0);

    // A file the cache lacks, offline, is a clear download error naming it.
    let err = tuwen::checkpoint::hub::fetch(repo, "missing.bin", false).unwrap_err();
    assert!(err.to_string().contains("missing.bin"), "{err}");

    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_ENDPOINT");
    std::env::remove_var("HF_HOME");
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
