// swift-tools-version:6.0
// nolad: a daemon that labels unlabeled image collections with the NoLA method.
// Layers, lowest first (DESIGN.md): C shims → Kernels → Models, Imaging → Method → Queue → Pipeline → Daemon
// → NoladCLI (Sources/CommandLine) → nolad. Each layer is a folder under Sources/.
import Foundation
import PackageDescription

/// Which CPU the numeric targets are compiled for (docs/platforms.md): `x86-64-v3` (AVX2 + FMA, Haswell /
/// Zen and later) or `generic` (the target's baseline: SSE2 on x86-64, NEON on aarch64). The default follows
/// the machine that evaluates this manifest, which is the build target of a native build: x86-64-v3 on
/// x86-64, generic elsewhere. Set NOLAD_CPU when that is not the target (cross-compiling, or an x86-64 CPU
/// without AVX2), e.g. `NOLAD_CPU=generic swift build`.
let noladCPU: String = {
    if let chosen = ProcessInfo.processInfo.environment["NOLAD_CPU"], !chosen.isEmpty { return chosen }
    #if arch(x86_64)
    return "x86-64-v3"
    #else
    return "generic"
    #endif
}()
guard ["x86-64-v3", "generic"].contains(noladCPU) else {
    fatalError("NOLAD_CPU is \"\(noladCPU)\"; use x86-64-v3 (AVX2 + FMA) or generic (docs/platforms.md)")
}
let x86_64_v3 = noladCPU == "x86-64-v3"

/// Numeric targets are always optimised, also in debug builds, so tests and the daemon run the same fast
/// code paths; for x86-64-v3 they may use AVX2 + FMA (-Xcc -march also sets the CPU of Swift's code generator).
let numeric: [SwiftSetting] = [
    .unsafeFlags(["-O"] + (x86_64_v3 ? ["-Xcc", "-march=x86-64-v3", "-Xcc", "-mtune=znver3"] : [])),
]
/// Kernels also compiles as one module in debug builds (as every release build does): its SIMD helpers
/// (`load8`, `exp8`, …) live in one file and are used in others, and only whole-module optimisation inlines
/// them there; without it each is a call per 8 floats and the debug build's breakdown misleads.
/// NOLAD_FMA: the CPU has fused multiply-add, so `addingProduct` is one instruction (Kernels/Attention.swift).
let kernels: [SwiftSetting] = numeric + [.unsafeFlags(["-wmo", "-num-threads", "1"])] + (x86_64_v3 ? [.define("NOLAD_FMA")] : [])
/// The executable's start-up check refuses a CPU without x86-64-v3 (Sources/Daemon/CPUCheck.swift) when
/// the numeric code needs it. Pipeline, Daemon, NoladCLI and nolad are compiled for the baseline, so the check runs.
let cpuCheck: [SwiftSetting] = x86_64_v3 ? [.define("NOLAD_X86_64_V3")] : []

let package = Package(
    name: "nolad",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "nolad", targets: ["nolad"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.0"),
        // The optional /metrics, /healthz, /readyz listener (docs/operations.md): Prometheus text format
        // and a small HTTP server without NIO.
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swhitty/FlyingFox", from: "0.27.1"),
    ],
    targets: [
        // C shims
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas"),
        .systemLibrary(name: "CJPEG", pkgConfig: "libjpeg"),
        .systemLibrary(name: "CPNG", pkgConfig: "libpng"),
        .systemLibrary(name: "CPostgres", pkgConfig: "libpq"),
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd"),
        // libcurl for the LLM endpoint (http and https), driven with curl_multi_poll so waits can be stopped.
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl"),
        // libjpeg/libpng calls behind setjmp (their errors longjmp, which Swift cannot survive), and the
        // x86-64-v3 CPU check (cpu_features.c). Compiled for the baseline CPU: never add -march here.
        .target(name: "CImageSupport", dependencies: ["CJPEG", "CPNG"],
                cSettings: [.unsafeFlags(["-O2"])],
                linkerSettings: [.linkedLibrary("jpeg"), .linkedLibrary("png16")]),

        // Tensor kernels: Float32 buffers, GEMM through OpenBLAS, forward/backward pairs.
        .target(name: "Kernels", dependencies: ["COpenBLAS"], swiftSettings: kernels),
        // Models: checkpoint loading, CLIP, DINO/DINOv2, the CLIP tokenizer.
        .target(name: "Models", dependencies: ["Kernels"], swiftSettings: numeric),
        // Imaging: JPEG/PNG decoding, Pillow-exact resampling, augmentations.
        .target(name: "Imaging", dependencies: ["CJPEG", "CPNG", "CImageSupport"], swiftSettings: numeric),
        // Method: the four NoLA stages as plain functions, no database.
        .target(name: "Method", dependencies: ["Kernels", "Models", "Imaging", "CCurl"], swiftSettings: numeric),
        // Queue: PostgreSQL access, migrations, claiming, leases, results.
        .target(name: "Queue", dependencies: [
            "CPostgres",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Pipeline: the NoLA job stages (validate, discover, describe, encode, pseudolabel, tune, label), the
        // JobStage/JobContext plug-in point they run through, the model cache and the collection walk.
        .target(name: "Pipeline", dependencies: [
            "Queue", "Method", "Models", "Imaging", "Kernels", "CImageSupport",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Daemon: the service — configuration, the worker loop and leases, signals, systemd, metrics.
        .target(name: "Daemon", dependencies: [
            "Pipeline", "Queue", "Method", "Kernels", "CSystemd", "CImageSupport",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Yams", package: "Yams"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "FlyingFox", package: "FlyingFox"),
            .product(name: "FlyingSocks", package: "FlyingFox"),
        ], swiftSettings: cpuCheck),
        // NoladCLI: the command line (serve, submit, status, labels, export, evaluate, benches, ...), a
        // library so tests can call the commands' pure parts in-process.
        .target(name: "NoladCLI", dependencies: [
            "Daemon", "Pipeline", "Queue", "Method", "Models", "Imaging", "Kernels",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ], path: "Sources/CommandLine"),
        // nolad: the entry point (the CPU check, then the command line).
        .executableTarget(name: "nolad", dependencies: [
            "NoladCLI", "Daemon", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "KernelsTests", dependencies: ["Kernels"], swiftSettings: numeric),
        .testTarget(name: "ModelsTests", dependencies: ["Models", "Kernels"], exclude: ["Fixtures"], swiftSettings: numeric),
        .testTarget(name: "ImagingTests", dependencies: ["Imaging"], exclude: ["Fixtures"], swiftSettings: numeric),
        .testTarget(name: "MethodTests", dependencies: ["Method"], exclude: ["Fixtures"], swiftSettings: numeric),
        .testTarget(name: "QueueTests", dependencies: ["Queue", "Pipeline", "Daemon", "NoladCLI", "Imaging", "Models"]),
        .testTarget(name: "DatabaseTests", dependencies: ["Queue", "Pipeline", "Daemon", "Models", "Method"], exclude: ["Fixtures"]),
    ],
    swiftLanguageModes: [.v5]
)
