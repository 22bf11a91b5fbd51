//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/control.proto", "proto/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Keeps every SignedNetMap (one per stream in the controller's
        // channels) small when it carries no delta.
        .boxed(".ztmesh.control.v1.SignedNetMap.delta")
        .boxed(".ztmesh.control.v1.NetMapDelta.rest")
        .compile_fds(fds)?;
    Ok(())
}
