// swift-tools-version:6.0
// nolad: a daemon that labels unlabeled image collections with the NoLA method.
// Layers, lowest first (DESIGN.md): C shims → Kernels → Models, Imaging → Method → Queue → Daemon → nolad.
import PackageDescription

/// Numeric targets are always optimised and compiled for AVX2 + FMA (Zen 3 / Haswell and later),
/// also in debug builds, so tests and the daemon run the same fast code paths.
let numeric: [SwiftSetting] = [
    .unsafeFlags(["-O", "-Xcc", "-march=x86-64-v3", "-Xcc", "-mtune=znver3"]),
]

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
        // libjpeg/libpng calls behind setjmp (their errors longjmp, which Swift cannot survive).
        .target(name: "CImageSupport", dependencies: ["CJPEG", "CPNG"],
                cSettings: [.unsafeFlags(["-O2"])],
                linkerSettings: [.linkedLibrary("jpeg"), .linkedLibrary("png16")]),

        // Tensor kernels: Float32 buffers, GEMM through OpenBLAS, forward/backward pairs.
        .target(name: "Kernels", dependencies: ["COpenBLAS"], swiftSettings: numeric),
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
        // Daemon: configuration, the worker service, systemd integration, CLI commands.
        .target(name: "Daemon", dependencies: [
            "Queue", "Method", "Models", "Imaging", "Kernels", "CSystemd",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Yams", package: "Yams"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "FlyingFox", package: "FlyingFox"),
            .product(name: "FlyingSocks", package: "FlyingFox"),
        ]),
        .executableTarget(name: "nolad", dependencies: [
            "Daemon", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "KernelsTests", dependencies: ["Kernels"], swiftSettings: numeric),
        .testTarget(name: "ModelsTests", dependencies: ["Models", "Kernels"], exclude: ["Fixtures"], swiftSettings: numeric),
        .testTarget(name: "ImagingTests", dependencies: ["Imaging"], exclude: ["Fixtures"], swiftSettings: numeric),
        .testTarget(name: "MethodTests", dependencies: ["Method"], exclude: ["Fixtures"], swiftSettings: numeric),
        .testTarget(name: "QueueTests", dependencies: ["Queue", "Daemon", "Imaging"]),
        .testTarget(name: "DatabaseTests", dependencies: ["Queue", "Daemon", "Models", "Method"], exclude: ["Fixtures"]),
    ],
    swiftLanguageModes: [.v5]
)
