//! The `.pth` reader on hostile and unusual checkpoints, built here with the `zip` crate and
//! hand-written pickles (no Python needed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tuwen::checkpoint::convert::{convert_pth, list_pth, ConvertOptions};
use tuwen::checkpoint::{open_pth, pth_top_level_keys, Loader, TensorSource};
use tuwen::Error;

use crate::examples::example;

/// Writes pickle opcodes (protocol 2, as `torch.save` does).
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Self(vec![0x80, 2])
    }

    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }

    fn int(&mut self, v: i64) -> &mut Self {
        match i32::try_from(v) {
            Ok(v) => {
                self.0.push(b'J');
                self.0.extend(v.to_le_bytes());
            }
            Err(_) => {
                self.0.extend([0x8a, 8]);
                self.0.extend(v.to_le_bytes());
            }
        }
        self
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
        self
    }

    fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }

    /// `_rebuild_tensor_v2(('storage', torch.<kind>, key, 'cpu', numel), offset, shape,
    /// stride, False, OrderedDict())`, wrapped in `_rebuild_parameter` when `param`.
    fn tensor(&mut self, t: &Spec) -> &mut Self {
        if t.param {
            self.global("torch._utils", "_rebuild_parameter");
        }
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(")
            .str("storage")
            .global("torch", t.kind)
            .str(t.key)
            .str("cpu")
            .int(t.numel)
            .op(b"tQ");
        self.int(t.offset)
            .ints(&t.shape)
            .ints(&t.stride)
            .op(b"\x89");
        self.global("collections", "OrderedDict").op(b")R");
        self.op(b"tR");
        if t.param {
            self.op(b"\x88")
                .global("collections", "OrderedDict")
                .op(b")R\x87R");
        }
        self
    }

    /// A dict of the tensors.
    fn state_dict(&mut self, specs: &[Spec]) -> &mut Self {
        self.op(b"}(");
        for s in specs {
            self.str(s.name).tensor(s);
        }
        self.op(b"u")
    }

    fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

#[derive(Clone)]
struct Spec {
    name: &'static str,
    kind: &'static str,
    key: &'static str,
    numel: i64,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
    param: bool,
}

/// A contiguous tensor over the whole of its storage.
fn spec(name: &'static str, kind: &'static str, key: &'static str, shape: &[i64]) -> Spec {
    let mut stride = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    Spec {
        name,
        kind,
        key,
        numel: shape.iter().product(),
        offset: 0,
        shape: shape.to_vec(),
        stride,
        param: false,
    }
}

fn view(s: Spec, offset: i64, shape: &[i64], stride: &[i64]) -> Spec {
    Spec {
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
        ..s
    }
}

/// A torch-like zip: `<prefix>/data.pkl`, `byteorder`, `data/<key>` (stored).
fn write_pth(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("ck/data.pkl", o).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("ck/byteorder", o).unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("ck/data/{key}"), o).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.start_file("ck/version", o).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn reason(e: Error) -> String {
    match e {
        Error::Checkpoint { reason, .. } => reason,
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    }
}

fn open_err(path: &Path, key: Option<&str>) -> String {
    reason(open_pth(path, key).unwrap_err())
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn a_huge_shape_is_refused_before_any_allocation() {
    let dir = tmp();
    let path = dir.path().join("huge.pth");
    let huge = view(
        spec("huge", "FloatStorage", "0", &[4]),
        0,
        &[1 << 20, 1 << 20, 1 << 20],
        &[1 << 40, 1 << 20, 1],
    );
    let ok = spec("ok", "FloatStorage", "1", &[2]);
    let p = Pickle::new().state_dict(&[huge, ok]).stop();
    write_pth(
        &path,
        &p,
        &[
            ("0", f32_bytes(&[1., 2., 3., 4.])),
            ("1", f32_bytes(&[5., 6.])),
        ],
    );
    let start = Instant::now();
    let src = open_pth(&path, None).unwrap();
    let bad = src.unsupported();
    assert_eq!(bad.len(), 1, "{bad:?}");
    let (name, why) = &bad[0];
    assert_eq!(name, "huge");
    // (2^20 - 1) * (2^40 + 2^20 + 1) + 1 elements of 4 bytes.
    let needed = ((1u64 << 20) - 1) * ((1u64 << 40) + (1 << 20) + 1) * 4 + 4;
    for want in [
        "[1048576, 1048576, 1048576]",
        &format!("needs {needed} bytes"),
        "storage `ck/data/0` holds 16",
    ] {
        assert!(why.contains(want), "{why} (want {want})");
    }
    assert!(src.contains("huge") && !src.shapes().contains_key("huge"));
    let e = src.load("huge").unwrap_err().to_string();
    assert!(e.contains("`huge`") && e.contains("holds 16"), "{e}");
    assert_eq!(
        src.load("ok").unwrap().unwrap().to_vec1::<f32>().unwrap(),
        [5., 6.]
    );

    // A model asking for it gets the reason, naming the key.
    let loader = Loader::new(src, "huge.pth");
    let vb = loader.var_builder(DType::F32, &Device::Cpu);
    let e = vb
        .get((1usize << 20, 1usize << 20, 1usize << 20), "huge")
        .map(|_| ())
        .unwrap_err();
    let e = reason(loader.error(e));
    assert!(
        e.starts_with("cannot read tensor `huge`: shape [1048576"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn views_beyond_their_storage_are_named() {
    let dir = tmp();
    let path = dir.path().join("views.pth");
    let base = spec("x", "FloatStorage", "0", &[6]);
    let specs = [
        view(
            Spec {
                name: "offset",
                ..base.clone()
            },
            1,
            &[2, 3],
            &[3, 1],
        ),
        view(
            Spec {
                name: "stride",
                ..base.clone()
            },
            0,
            &[2, 3],
            &[4, 1],
        ),
        view(
            Spec {
                name: "product",
                ..base.clone()
            },
            0,
            &[1 << 62, 8],
            &[8, 1],
        ),
        view(
            Spec {
                name: "overflow",
                ..base.clone()
            },
            0,
            &[3, 2],
            &[i64::MAX, 1],
        ),
        view(
            Spec {
                name: "expanded",
                ..base.clone()
            },
            0,
            &[1 << 31, 1 << 20],
            &[0, 0],
        ),
        Spec {
            name: "lost",
            key: "9",
            ..base.clone()
        },
        Spec {
            name: "fine",
            ..base
        },
    ];
    let p = Pickle::new().state_dict(&specs).stop();
    write_pth(&path, &p, &[("0", f32_bytes(&[0., 1., 2., 3., 4., 5.]))]);
    let src = open_pth(&path, None).unwrap();
    let bad: std::collections::BTreeMap<String, String> = src.unsupported().into_iter().collect();
    println!("{bad:#?}");
    assert_eq!(
        bad.keys().map(String::as_str).collect::<Vec<_>>(),
        ["expanded", "lost", "offset", "overflow", "product", "stride"]
    );
    assert!(bad["offset"].contains("offset 1 needs 28 bytes but storage `ck/data/0` holds 24"));
    assert!(bad["stride"].contains("stride [4, 1] and offset 0 needs 28 bytes"));
    assert!(bad["product"].contains("overflows"), "{}", bad["product"]);
    assert!(bad["overflow"].contains("overflows"), "{}", bad["overflow"]);
    assert!(
        bad["expanded"].contains("expanded view"),
        "{}",
        bad["expanded"]
    );
    assert!(bad["lost"].contains("`ck/data/9` is not in the archive"));
    assert_eq!(src.shapes().into_keys().collect::<Vec<_>>(), ["fine"]);
    for name in bad.keys() {
        let e = src.load(name).unwrap_err().to_string();
        assert!(e.contains(&format!("`{name}`")), "{e}");
    }
}

/// The pickle of a 2 MB file nested 10^6 levels deep: an error, not a stack overflow, on
/// the test's own thread.
#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let dir = tmp();
    let n = 1_000_000;
    let mut lists = vec![0x80, 2];
    lists.extend(std::iter::repeat_n(b']', n));
    lists.extend(std::iter::repeat_n(b'a', n - 1));
    lists.push(b'.');
    let mut marks = vec![0x80, 2];
    marks.extend(std::iter::repeat_n(b'(', 2 * n));
    marks.extend(b"t.");
    let mut tuples = vec![0x80, 2, b')'];
    tuples.extend(std::iter::repeat_n(0x85, 2 * n));
    tuples.push(b'.');
    // x = None(x) over and over: REDUCE builds on the previous value.
    let mut reduces = vec![0x80, 2, b'N'];
    for _ in 0..n {
        reduces.extend(b"NR");
    }
    reduces.push(b'.');
    for (name, p) in [
        ("lists", lists),
        ("marks", marks),
        ("tuples", tuples),
        ("reduces", reduces),
    ] {
        assert!(p.len() >= n, "{name}");
        let path = dir.path().join(format!("{name}.pth"));
        write_pth(&path, &p, &[]);
        let start = Instant::now();
        let e = open_err(&path, None);
        assert!(
            e.contains("pickle nesting deeper than 1000 levels at byte"),
            "{name}: {e}"
        );
        assert!(start.elapsed() < Duration::from_secs(10), "{name}");
        let e = reason(pth_top_level_keys(&path).unwrap_err());
        assert!(e.contains("nesting"), "{e}");
    }
}

#[test]
fn bad_pickles_and_archives_are_checkpoint_errors() {
    let dir = tmp();
    let good = Pickle::new()
        .state_dict(&[spec("w", "FloatStorage", "0", &[2, 2])])
        .stop();
    let storage = [("0", f32_bytes(&[1., 2., 3., 4.]))];

    let path = dir.path().join("opcode.pth");
    write_pth(&path, b"\x80\x02}\xff.", &storage);
    let e = open_err(&path, None);
    assert!(e.contains("unknown pickle opcode 0xff at byte 3"), "{e}");

    let path = dir.path().join("cut_pickle.pth");
    write_pth(&path, &good[..good.len() / 2], &storage);
    let e = open_err(&path, None);
    assert!(e.contains("truncated pickle"), "{e}");

    let path = dir.path().join("good.pth");
    write_pth(&path, &good, &storage);
    let src = open_pth(&path, None).unwrap();
    assert_eq!(
        src.load("w").unwrap().unwrap().to_vec2::<f32>().unwrap(),
        [[1., 2.], [3., 4.]]
    );
    let bytes = std::fs::read(&path).unwrap();
    for n in [bytes.len() / 2, bytes.len() - 10, 3] {
        let cut = dir.path().join(format!("cut{n}.pth"));
        std::fs::write(&cut, &bytes[..n]).unwrap();
        let e = open_err(&cut, None);
        println!("cut to {n}: {e}");
        assert!(matches!(
            TensorSource::open(&cut, None),
            Err(Error::Checkpoint { .. })
        ));
        assert!(matches!(
            pth_top_level_keys(&cut),
            Err(Error::Checkpoint { .. })
        ));
    }

    // A storage entry shorter than its tensor (the archive itself is well formed).
    let path = dir.path().join("short.pth");
    write_pth(&path, &good, &[("0", f32_bytes(&[1., 2., 3.]))]);
    let src = open_pth(&path, None).unwrap();
    assert!(src.unsupported()[0]
        .1
        .contains("needs 16 bytes but storage `ck/data/0` holds 12"));

    // A big-endian checkpoint.
    let path = dir.path().join("big.pth");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let o = zip::write::SimpleFileOptions::default();
    z.start_file("ck/data.pkl", o).unwrap();
    z.write_all(&good).unwrap();
    z.start_file("ck/byteorder", o).unwrap();
    z.write_all(b"big").unwrap();
    z.finish().unwrap();
    assert!(open_err(&path, None).contains("big-endian"));

    // Not a checkpoint: a zip without data.pkl, and a file that is not a zip.
    let path = dir.path().join("other.pth");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    z.start_file("readme.txt", o).unwrap();
    z.finish().unwrap();
    assert!(open_err(&path, None).contains("no `data.pkl`"));
    let path = dir.path().join("legacy.pth");
    std::fs::write(&path, &good).unwrap();
    assert!(open_err(&path, None).contains("legacy"));
}

fn mixed_dtypes(dir: &Path) -> PathBuf {
    let path = dir.join("mixed.pth");
    let mut p = Pickle::new();
    p.op(b"}(").str("epoch").int(3).str("model");
    p.state_dict(&[
        spec("q", "CharStorage", "0", &[4]),
        spec("mask", "BoolStorage", "1", &[2, 2]),
        spec("w", "FloatStorage", "2", &[3]),
    ]);
    let p = p.op(b"u").stop();
    write_pth(
        &path,
        &p,
        &[
            ("0", vec![1, 255, 3, 4]),
            ("1", vec![1, 0, 0, 1]),
            ("2", f32_bytes(&[0.5, 1.5, 2.5])),
        ],
    );
    path
}

#[test]
fn unreadable_dtypes_fail_the_conversion_unless_allowed() {
    let dir = tmp();
    let path = mixed_dtypes(dir.path());
    let out = dir.path().join("out.safetensors");
    assert_eq!(pth_top_level_keys(&path).unwrap(), ["model"]);

    let e = reason(convert_pth(&path, &out, &ConvertOptions::default()).unwrap_err());
    for want in [
        "2 tensor(s)",
        "`q`: dtype int8 (torch CharStorage)",
        "`mask`: dtype bool",
    ] {
        assert!(e.contains(want), "{e} (want {want})");
    }
    assert!(!out.exists());

    let report = convert_pth(
        &path,
        &out,
        &ConvertOptions {
            allow_unsupported: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.key.as_deref(), Some("model"));
    assert_eq!(report.written, 1);
    assert!(report.skipped.is_empty());
    let names: Vec<&str> = report.unsupported.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["mask", "q"]);
    let st = TensorSource::open(&out, None).unwrap();
    assert_eq!(st.shapes().into_keys().collect::<Vec<_>>(), ["w"]);
    assert_eq!(
        st.load("w").unwrap().unwrap().to_vec1::<f32>().unwrap(),
        [0.5, 1.5, 2.5]
    );

    // Skipped tensors need no permission.
    let report = convert_pth(
        &path,
        &out,
        &ConvertOptions {
            skip: vec!["q".into(), "mask".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.skipped, ["mask", "q"]);
    assert!(report.unsupported.is_empty());

    let listing = list_pth(&path, None).unwrap();
    assert_eq!(listing.key.as_deref(), Some("model"));
    assert_eq!(listing.tensors, [("w".to_string(), vec![3], DType::F32)]);
    assert_eq!(listing.unsupported.len(), 2);

    // A model asking for the int8 tensor learns why it cannot have it.
    let loader = Loader::new(open_pth(&path, Some("model")).unwrap(), "mixed.pth");
    let e = loader
        .var_builder(DType::F32, &Device::Cpu)
        .get(4, "q")
        .map(|_| ())
        .unwrap_err();
    let e = reason(loader.error(e));
    assert!(e.contains("cannot read tensor `q`: dtype int8"), "{e}");
}

#[test]
fn the_converter_names_unreadable_tensors() {
    let dir = tmp();
    let path = mixed_dtypes(dir.path());
    let out = dir.path().join("out.safetensors");
    let run = |extra: &[&str]| {
        let o = Command::new(example("convert"))
            .args(["--input", path.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!text.contains("panicked"), "{text}");
        (o.status.success(), text)
    };
    let (ok, text) = run(&["--output", out.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("`q`: dtype int8") && text.contains("`mask`: dtype bool"),
        "{text}"
    );
    assert!(!out.exists());

    let (ok, text) = run(&["--output", out.to_str().unwrap(), "--allow-unsupported"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("wrote 1 tensors") && text.contains("unsupported 2"),
        "{text}"
    );
    assert!(text.contains("not written: q: dtype int8"), "{text}");

    let (ok, text) = run(&["--list"]);
    assert!(ok, "{text}");
    assert!(text.contains("mask\tunsupported: dtype bool"), "{text}");
    assert!(text.contains("1 tensors, 2 unsupported"), "{text}");
}

#[test]
fn strided_views_and_every_dtype_load_with_their_values() {
    let dir = tmp();
    let path = dir.path().join("views.pth");
    let base = spec("t", "FloatStorage", "0", &[6]);
    let specs = [
        // The transpose of [[0, 1, 2], [3, 4, 5]], as a parameter.
        Spec {
            param: true,
            ..view(base.clone(), 0, &[3, 2], &[1, 3])
        },
        view(
            Spec {
                name: "sub",
                ..base.clone()
            },
            1,
            &[2],
            &[2],
        ),
        view(
            Spec {
                name: "expanded",
                ..base.clone()
            },
            0,
            &[2, 3],
            &[0, 1],
        ),
        view(
            Spec {
                name: "scalar",
                ..base.clone()
            },
            5,
            &[],
            &[],
        ),
        view(
            Spec {
                name: "empty",
                ..base.clone()
            },
            99,
            &[0, 3],
            &[3, 1],
        ),
        view(
            Spec {
                name: "column",
                ..base
            },
            4,
            &[2, 1],
            &[1, 9],
        ),
        spec("h", "HalfStorage", "1", &[2]),
        spec("bf", "BFloat16Storage", "2", &[2]),
        spec("d", "DoubleStorage", "3", &[2]),
        spec("l", "LongStorage", "4", &[2]),
        spec("i", "IntStorage", "5", &[2]),
        spec("s", "ShortStorage", "6", &[2]),
        spec("b", "ByteStorage", "7", &[2]),
    ];
    let p = Pickle::new().state_dict(&specs).stop();
    let le = |v: &[&[u8]]| v.concat();
    write_pth(
        &path,
        &p,
        &[
            ("0", f32_bytes(&[0., 1., 2., 3., 4., 5.])),
            (
                "1",
                le(&[
                    &half::f16::from_f32(1.5).to_bits().to_le_bytes(),
                    &half::f16::from_f32(-2.0).to_bits().to_le_bytes(),
                ]),
            ),
            (
                "2",
                le(&[
                    &half::bf16::from_f32(3.0).to_bits().to_le_bytes(),
                    &half::bf16::from_f32(-0.5).to_bits().to_le_bytes(),
                ]),
            ),
            (
                "3",
                le(&[&1e300f64.to_le_bytes(), &(-2.25f64).to_le_bytes()]),
            ),
            (
                "4",
                le(&[&(1i64 << 40).to_le_bytes(), &(-7i64).to_le_bytes()]),
            ),
            ("5", le(&[&(-70000i32).to_le_bytes(), &9i32.to_le_bytes()])),
            ("6", le(&[&(-300i16).to_le_bytes(), &12i16.to_le_bytes()])),
            ("7", vec![200, 7]),
        ],
    );
    let src = open_pth(&path, None).unwrap();
    assert!(src.unsupported().is_empty(), "{:?}", src.unsupported());
    let get = |n: &str| src.load(n).unwrap().unwrap();
    assert_eq!(
        get("t").to_vec2::<f32>().unwrap(),
        [[0., 3.], [1., 4.], [2., 5.]]
    );
    assert_eq!(get("sub").to_vec1::<f32>().unwrap(), [1., 3.]);
    assert_eq!(
        get("expanded").to_vec2::<f32>().unwrap(),
        [[0., 1., 2.], [0., 1., 2.]]
    );
    assert_eq!(get("scalar").to_scalar::<f32>().unwrap(), 5.);
    assert_eq!(get("empty").dims(), [0, 3]);
    assert_eq!(get("column").to_vec2::<f32>().unwrap(), [[4.], [5.]]);
    let h = get("h");
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(
        h.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        [1.5, -2.0]
    );
    let bf = get("bf");
    assert_eq!(bf.dtype(), DType::BF16);
    assert_eq!(
        bf.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        [3.0, -0.5]
    );
    assert_eq!(get("d").to_vec1::<f64>().unwrap(), [1e300, -2.25]);
    assert_eq!(get("l").to_vec1::<i64>().unwrap(), [1 << 40, -7]);
    assert_eq!(get("i").dtype(), DType::I32);
    assert_eq!(
        get("i")
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap(),
        [-70000, 9]
    );
    assert_eq!(get("s").dtype(), DType::I16);
    assert_eq!(
        get("s")
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap(),
        [-300, 12]
    );
    assert_eq!(get("b").to_vec1::<u8>().unwrap(), [200, 7]);
    assert!(src.load("absent").unwrap().is_none());
}

#[test]
fn nested_keys_are_checked_and_other_objects_ignored() {
    let dir = tmp();
    let path = dir.path().join("ck.pth");
    let mut p = Pickle::new();
    p.op(b"}(").str("epoch").int(7);
    // An argparse.Namespace (NEWOBJ + BUILD), an optimizer state with int keys and a
    // nested dict of tensors, and a numpy-like scalar (REDUCE of an unknown global).
    p.str("args")
        .global("argparse", "Namespace")
        .op(b")\x81}")
        .str("lr")
        .op(b"G\x3f\x50\x62\x4d\xd2\xf1\xa9\xfcsb");
    p.str("optimizer")
        .op(b"}(")
        .int(0)
        .op(b"}")
        .str("step")
        .int(5)
        .op(b"su");
    p.str("numpy")
        .global("numpy.core.multiarray", "scalar")
        .op(b"C\x04abcd\x85R");
    p.str("model")
        .state_dict(&[spec("w", "FloatStorage", "0", &[2])]);
    let p = p.op(b"u").stop();
    write_pth(&path, &p, &[("0", f32_bytes(&[1., 2.]))]);

    assert_eq!(pth_top_level_keys(&path).unwrap(), ["model"]);
    let src = open_pth(&path, Some("model")).unwrap();
    assert_eq!(src.shapes().into_keys().collect::<Vec<_>>(), ["w"]);
    let e = open_err(&path, Some("state_dict"));
    assert!(
        e.contains("no key 'state_dict' at the top level") && e.contains("'model'"),
        "{e}"
    );
    let e = open_err(&path, Some("epoch"));
    assert!(e.contains("'epoch' is an int, not a dict"), "{e}");
    // The top level holds no tensors of its own.
    let e = open_err(&path, None);
    assert!(e.contains("no tensors found"), "{e}");
    // A nested dict is not flattened (as candle's reader did not).
    let e = open_err(&path, Some("optimizer"));
    assert!(e.contains("no tensors under key 'optimizer'"), "{e}");
}
