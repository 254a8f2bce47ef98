//! Regenerates the code in `src/generated/` from `proto/` and fails if the committed files differ.
//! `HYPERFARM_BLESS=1 cargo test -p hyperfarm-proto --test bootstrap` writes them instead.

use std::path::{Path, PathBuf};

use prost::Message;

#[test]
fn generated_code_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos = [root.join("proto/hyperfarm/v1/agent.proto")];
    let fds = protox::compile(&protos, [root.join("proto")]).expect("the .proto files compile");
    let descriptor = fds.encode_to_vec();

    let out = tempfile::tempdir().expect("tempdir");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("code generation");

    let generated = root.join("src/generated");
    let pairs: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            generated.join("hyperfarm.v1.rs"),
            std::fs::read(out.path().join("hyperfarm.v1.rs")).expect("generated module"),
        ),
        (generated.join("descriptor.bin"), descriptor),
    ];
    let bless = std::env::var_os("HYPERFARM_BLESS").is_some();
    let mut stale = Vec::new();
    for (path, fresh) in pairs {
        let committed = std::fs::read(&path).unwrap_or_default();
        if committed != fresh {
            if bless {
                std::fs::write(&path, &fresh).expect("write generated file");
            } else {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated code is stale: {}\nrun: HYPERFARM_BLESS=1 cargo test -p hyperfarm-proto --test bootstrap, and commit the result",
        stale.join(", ")
    );
}
