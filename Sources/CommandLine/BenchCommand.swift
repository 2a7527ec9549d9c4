import ArgumentParser
import Daemon
import Foundation
import Imaging
import Kernels
import Method
import Models

/// `nolad bench`: the networks' speed with random full-size weights, next to the FLOPs they count, the
/// sgemm rate this machine reaches on their own GEMM shapes in the same run, and where the time goes
/// (docs/benchmarks.md). reference/bench_torch.py is its PyTorch counterpart.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Speed of CLIP ViT-B/32 (image, text, prompt-tuning step) and DINO ViT-B/16 with random full-size weights (with --mobileclip: MobileCLIP and CLIP ViT-B/16 too).",
        discussion: """
        Each figure is timed first as it runs in a job, then once more with the kernel timers on for its \
        breakdown and FLOP count. The sgemm rate is measured at the end, through nolad's own sgemm (the one \
        the models call) at --threads, on every GEMM shape the linear layers ran. \
        Compare with reference/bench_torch.py run with the same --threads and --batch.
        """)

    @Option(help: "Threads for the numeric kernels (GEMMs included).") var threads = 2
    @Option(help: "Images per batch.") var batch = 16
    @Option(help: "Timed repetitions after one warm-up.") var iterations = 3
    @Option(help: "Tokens per text, BOS and EOS included.") var textTokens = 20
    @Option(help: "Prompt tokens for the prompt-tuning step.") var prompts = 16
    @Option(help: "Comma-separated subset of: clip-image, clip-text, prompt-step, strong-views, dino, and the MobileCLIP rows with their CLIP ViT-B/16 reference (clip-b16-image, clip-b16-prompt-step, mobileclip-b-image, mobileclip-s2-image, mobileclip-s1-image, mobileclip-s0-image, mobileclip-text, mobileclip-s-text, mobileclip-b-prompt-step, mobileclip-s2-tune-step).") var only: String?
    @Flag(help: "Also the MobileCLIP rows (full-size random MobileCLIP-B, S2, S1, S0; reference/bench_mobileclip_torch.py is their PyTorch side) and CLIP ViT-B/16's image and prompt-tuning step beside them (reference/bench_torch.py).") var mobileclip = false
    @Option(help: "Seconds of sgemm timing per GEMM shape (5 rounds, the best one counts).") var sgemmSeconds = 0.2
    @Flag(help: "One JSON object on stdout instead of the text report.") var json = false
    @Option(help: "Attention kernel: per-head (the default: OpenBLAS calls per head and product), tiled (our register tiles, head sizes that are multiples of 16), or ab: CLIP image, CLIP text, prompt step, DINO and the attention-* figures timed with both, interleaved, instead of their usual figures.") var attention: String?

    static let figureNames = ["clip-image", "clip-text", "prompt-step", "strong-views", "dino"] + mobileCLIPFigureNames + attentionFigureNames
    /// The attention op alone on each network's shapes (12 layers' worth; the prompt step's forward and backward),
    /// only when named in --only: with --attention ab, an A/B of the two kernels with less else in the time.
    static let attentionFigureNames = ["attention-clip-image", "attention-prompt-step", "attention-dino"]
    /// The rows `--mobileclip` adds: CLIP ViT-B/16 (the tower MobileCLIP is compared with) and MobileCLIP's.
    static let mobileCLIPFigureNames = ["clip-b16-image", "clip-b16-prompt-step", "mobileclip-b-image", "mobileclip-s2-image", "mobileclip-s1-image", "mobileclip-s0-image",
                                        "mobileclip-text", "mobileclip-s-text", "mobileclip-b-prompt-step", "mobileclip-s2-tune-step"]

    func validate() throws {
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
        guard batch >= 1 else { throw ValidationError("--batch must be at least 1") }
        guard iterations >= 1 else { throw ValidationError("--iterations must be at least 1") }
        guard textTokens >= 2 && textTokens <= 77 else { throw ValidationError("--text-tokens must be 2 to 77 (BOS and EOS included)") }
        guard prompts >= 0 else { throw ValidationError("--prompts must be 0 or more") }
        guard sgemmSeconds > 0 else { throw ValidationError("--sgemm-seconds must be positive") }
        if let attention, !["tiled", "per-head", "ab"].contains(attention) {
            throw ValidationError("--attention must be tiled, per-head or ab")
        }
        if let only {
            let unknown = only.split(separator: ",").map(String.init).filter { !Self.figureNames.contains($0) }
            guard unknown.isEmpty else {
                throw ValidationError("--only: unknown \(unknown.joined(separator: ", ")); choose from \(Self.figureNames.joined(separator: ", "))")
            }
        }
    }

    /// A figure named in --only; without --only every CLIP/DINO figure, and the MobileCLIP ones with --mobileclip.
    func wanted(_ name: String) -> Bool {
        only.map { $0.split(separator: ",").contains(Substring(name)) }
            ?? (!Self.attentionFigureNames.contains(name) && (mobileclip || !Self.mobileCLIPFigureNames.contains(name)))
    }

    /// Every kernel of the command runs with `--threads` threads (docs/threading.md).
    func run() throws {
        let kernel: AttentionKernel? = attention == "tiled" ? .tiled : (attention == "per-head" ? .perHeadGEMM : nil)
        try withThreads(threads) { try withAttentionKernel(kernel) { try runWithThreads() } }
    }

    func say(_ line: String) { if !json { print(line) } }

    func runWithThreads() throws {
        say("nolad bench: threads \(threads), batch \(batch), \(iterations) iterations after a warm-up, random weights")
        let clip = try CLIPModel(config: CLIPConfig(), weights: nil)
        let dino = try ViTModel(kind: .vit, config: ViTConfig(), weights: nil)
        var rng = SplitMix64(seed: 1)
        let pixels = (0..<(batch * 3 * 224 * 224)).map { _ in Float.random(in: -2...2, using: &rng) }
        var figures: [BenchFigure] = []
        var comparisons: [AttentionComparison] = []
        func add(_ figure: BenchFigure) { figures.append(figure); say(figure.timingLine) }
        /// A figure as usual, or with `--attention ab` its time with each attention kernel.
        func add(_ name: String, key: String, items: Int, unit: String, _ body: () -> Void) {
            guard attention == "ab" else { add(measure(name, key: key, items: items, unit: unit, body)); return }
            let comparison = compareAttention(name, key: key, items: items, unit: unit, body)
            comparisons.append(comparison)
            say(comparison.line)
        }
        pixels.withUnsafeBufferPointer { px in
            let p = px.baseAddress!
            if wanted("clip-image") {
                add("CLIP ViT-B/32 image", key: "clip-image", items: batch, unit: "img") { _ = clip.getImageFeatures(pixels: p, batch: batch) }
            }
            let texts = (0..<(4 * batch)).map { _ in [49406] + (0..<(textTokens - 2)).map { _ in Int32.random(in: 1..<49406, using: &rng) } + [49407] }
            if wanted("clip-text") {
                add("CLIP text (\(textTokens) tokens)", key: "clip-text", items: texts.count, unit: "text") { _ = clip.getTextFeatures(texts) }
            }
            if wanted("prompt-step") {
                add("CLIP prompt-tuning step (P=\(prompts))", key: "prompt-step", items: batch, unit: "img",
                    clipPromptStepBody(clip, pixels: p, rng: &rng))
            }
            if wanted("strong-views") {
                // NoLA's strong views of one micro-batch, as prompt tuning makes them (photo-sized synthetic images, decoded already).
                let images = (0..<batch).map { i in syntheticImage(width: 320, height: 240, seed: UInt64(i)) }
                let slot = 3 * 224 * 224
                var out = [Float](repeating: 0, count: batch * slot)
                add(measure("strong views (320×240 → 224)", key: "strong-views", items: batch, unit: "img") {
                    out.withUnsafeMutableBufferPointer { buffer in
                        let base = buffer.baseAddress!
                        parallelFor(batch) { part in
                            for j in part {
                                var r = AugmentRNG(seed: UInt64(j))
                                let view = profiled(.augmentation, .forward) { strongView(images[j], rng: &r) }
                                copyFloats(base + j * slot, view, count: slot)
                            }
                        }
                    }
                })
            }
            if wanted("dino") {
                add("DINO ViT-B/16 image", key: "dino", items: batch, unit: "img") { _ = dino.clsFeatures(pixels: p, batch: batch, height: 224, width: 224) }
            }
            // ViT-B: D 768, 12 heads of 64; CLIP B/32 50 tokens (66 with the prompts), DINO B/16 197
            for (key, t, backward, name) in [("attention-clip-image", 50, false, "attention alone, CLIP B/32 image (T 50)"),
                                             ("attention-prompt-step", 50 + prompts, true, "attention alone, prompt step fwd + bwd (T \(50 + prompts))"),
                                             ("attention-dino", 197, false, "attention alone, DINO B/16 image (T 197)")] where wanted(key) {
                let d = 768, heads = 12
                let qkv = Buffer((0..<(batch * t * 3 * d)).map { _ in Float.random(in: -2...2, using: &rng) })
                let out = Buffer(count: batch * t * d), probs = Buffer(count: batch * heads * t * t), dqkv = Buffer(count: batch * t * 3 * d)
                add(name, key: key, items: batch, unit: "img") {
                    for _ in 0..<12 {
                        attentionForward(out.data, probs: backward ? probs.data : nil, qkv.data, b: batch, t: t, d: d, heads: heads, causal: false)
                        if backward {
                            attentionBackward(dqkv: dqkv.data, out.data, qkv.data, probs: probs.data, b: batch, t: t, d: d, heads: heads, accumulate: false)
                        }
                    }
                }
            }
            if wanted("mobileclip-text") || wanted("mobileclip-s-text") {
                // open_clip pads to 77 with 0; MobileCLIP-B's causal tower runs up to the end token, S0/S1/S2's all 77
                for (key, causal, name) in [("mobileclip-text", true, "MobileCLIP-B"), ("mobileclip-s-text", false, "MobileCLIP-S")] where wanted(key) {
                    var config = MobileCLIPConfig.mobileCLIPB()
                    config.textConfig.causal = causal
                    guard let model = try? MobileCLIPModel(config: config, weights: nil) else { continue }
                    add(measure("\(name) text (\(textTokens) tokens\(causal ? "" : " in 77"))", key: key, items: texts.count, unit: "text") { _ = model.getTextFeatures(texts) })
                }
            }
        }
        try clipB16Figures(add)
        try mobileCLIPImageFigures(add)
        let peak = peakResidentMegabytes()
        say(String(format: "peak memory (both models, batch %d): %.0f MB", batch, peak))

        // The sgemm rate on every shape the linear layers ran, through the same wrapper, at the same threads.
        let shapes = Set(figures.flatMap { $0.profile.gemmShapes.map(\.shape) }).sorted()
        var rates: [GEMMShape: Double] = [:]
        for shape in shapes { rates[shape] = sgemmRate(shape, seconds: sgemmSeconds) }
        let allFlops = figures.flatMap { $0.profile.gemmShapes }.reduce(0.0) { $0 + Double($1.flops) }
        let allTime = figures.flatMap { $0.profile.gemmShapes }.reduce(0.0) { $0 + Double($1.flops) / rates[$1.shape]! }
        let overall = allTime > 0 ? allFlops / allTime / 1e9 : 0
        say("")
        say(String(format: "sgemm through nolad's wrapper, %d threads, on the linear layers' shapes (m×n×k as called; C = op(A)·op(B)): %.1f GFLOP/s FLOP-weighted", threads, overall))
        let shares = Dictionary(figures.flatMap { $0.profile.gemmShapes }.map { ($0.shape, Double($0.flops) / max(allFlops, 1)) }, uniquingKeysWith: +)
        for shape in shapes.sorted(by: { shares[$0]! > shares[$1]! }) {
            say("  " + shape.description.padding(toLength: 22, withPad: " ", startingAt: 0)
                + String(format: "%8.1f GFLOP/s   (%4.1f %% of the linear layers' FLOPs below)", rates[shape]! / 1e9, shares[shape]! * 100))
        }
        for figure in figures { say(""); for line in figure.report(rates: rates, threads: threads) { say(line) } }
        if json {
            let object: [String: Any] = [
                "threads": threads, "batch": batch, "iterations": iterations, "peak_memory_mb": peak,
                "sgemm_gflops": overall,
                "sgemm": shapes.map { ["m": $0.m, "n": $0.n, "k": $0.k, "trans_a": $0.transA, "trans_b": $0.transB, "gflops": rates[$0]! / 1e9] },
                "figures": figures.map { $0.json(rates: rates, threads: threads) },
                "attention_ab": comparisons.map(\.json),
            ]
            print(jsonLine(object))
        }
    }

    /// The prompt-tuning step on `clip` as a job runs it: --prompts prompt tokens, a head of 10 classes on the
    /// L2-normalised features, label-smoothing cross-entropy, the backward to the prompts, LayerNorms and head.
    func clipPromptStep(_ clip: CLIPModel, name: String, key: String, pixels p: UnsafePointer<Float>, rng: inout SplitMix64) -> BenchFigure {
        return measure(name, key: key, items: batch, unit: "img", clipPromptStepBody(clip, pixels: p, rng: &rng))
    }

    /// One prompt-tuning step of `clipPromptStep`, to time.
    func clipPromptStepBody(_ clip: CLIPModel, pixels p: UnsafePointer<Float>, rng: inout SplitMix64) -> () -> Void {
        let d = clip.config.visionConfig.hiddenSize, classes = 10, batch = batch
        let state = CLIPPromptTuning(model: clip, prompts: (0..<(prompts * d)).map { _ in Float.random(in: -0.1...0.1, using: &rng) }, promptCount: prompts,
                                     head: (0..<(classes * clip.projectionDim)).map { _ in Float.random(in: -0.1...0.1, using: &rng) }, classCount: classes)
        let labels = (0..<batch).map { $0 % classes }
        return {
            _ = clip.promptTuningStep(state, pixels: p, batch: batch) { logits, dlogits in
                crossEntropyForwardBackward(dlogits: dlogits, logits, labels: labels, n: batch, c: classes, smoothing: 0.1)
            }
        }
    }

    /// CLIP ViT-B/16 (OpenAI's sizes, 14×14 patches of 16 px at 224 px; MobileCLIP's paper measures against
    /// it) with exact GELU as open_clip's `ViT-B-16`: image features and the prompt-tuning step, on its own
    /// full-size random model, released after its rows.
    func clipB16Figures(_ add: (BenchFigure) -> Void) throws {
        guard wanted("clip-b16-image") || wanted("clip-b16-prompt-step") else { return }
        var config = CLIPConfig()
        config.visionConfig.patchSize = 16
        config.visionConfig.hiddenAct = .gelu
        let clip = try CLIPModel(config: config, weights: nil)
        var rng = SplitMix64(seed: 3)
        let pixels = (0..<(batch * 3 * 224 * 224)).map { _ in Float.random(in: -2...2, using: &rng) }
        pixels.withUnsafeBufferPointer { px in
            let p = px.baseAddress!
            if wanted("clip-b16-image") {
                add(measure("CLIP ViT-B/16 image", key: "clip-b16-image", items: batch, unit: "img") { _ = clip.getImageFeatures(pixels: p, batch: batch) })
            }
            if wanted("clip-b16-prompt-step") {
                add(clipPromptStep(clip, name: "CLIP ViT-B/16 prompt step (P=\(prompts))", key: "clip-b16-prompt-step", pixels: p, rng: &rng))
            }
        }
    }

    /// The MobileCLIP image rows and tuning steps, each on its own full-size random model (B at 224 px,
    /// S0/S1/S2 at 256 px), released after its rows.
    func mobileCLIPImageFigures(_ add: (BenchFigure) -> Void) throws {
        var rng = SplitMix64(seed: 2)
        let classes = 10, labels = (0..<batch).map { $0 % classes }
        for (key, tower, name) in [("mobileclip-b-image", MobileCLIPTowerKind.vitBase, "MobileCLIP-B"), ("mobileclip-s2-image", .mci(2), "MobileCLIP-S2"),
                                   ("mobileclip-s1-image", .mci(1), "MobileCLIP-S1"), ("mobileclip-s0-image", .mci(0), "MobileCLIP-S0")] {
            let tuneKey = tower == .vitBase ? "mobileclip-b-prompt-step" : (tower == .mci(2) ? "mobileclip-s2-tune-step" : nil)
            guard wanted(key) || tuneKey.map(wanted) == true else { continue }
            var config = MobileCLIPConfig.mobileCLIPB()
            config.tower = tower
            if tower != .vitBase { config.imageSize = 256; config.textConfig.causal = false }
            let model = try MobileCLIPModel(config: config, weights: nil)
            let s = config.imageSize
            let pixels = (0..<(batch * 3 * s * s)).map { _ in Float.random(in: 0...1, using: &rng) }
            pixels.withUnsafeBufferPointer { px in
                let p = px.baseAddress!
                if wanted(key) {
                    add(measure("\(name) image (\(s) px)", key: key, items: batch, unit: "img") { _ = model.getImageFeatures(pixels: p, batch: batch) })
                }
                guard let tuneKey, wanted(tuneKey) else { return }
                switch model.imageTower {
                case .vit(let vit):
                    let state = MobileCLIPViTPromptTuning(tower: vit, prompts: (0..<(prompts * vit.hiddenSize)).map { _ in Float.random(in: -0.1...0.1, using: &rng) },
                                                          promptCount: prompts, head: (0..<(classes * vit.projectionDim)).map { _ in Float.random(in: -0.1...0.1, using: &rng) },
                                                          classCount: classes)
                    add(measure("\(name) prompt-tuning step (P=\(prompts))", key: tuneKey, items: batch, unit: "img") {
                        _ = vit.promptTuningStep(state, pixels: p, batch: batch) { logits, dlogits in
                            crossEntropyForwardBackward(dlogits: dlogits, logits, labels: labels, n: batch, c: classes, smoothing: 0.1)
                        }
                    })
                case .mci(let mci):
                    // the tuned variant: features, then the head's loss gradient as the trainer computes it
                    let tuned = mci.initialTunedTensors(), e = mci.embedDim
                    let head = (0..<(classes * e)).map { _ in Float.random(in: -0.1...0.1, using: &rng) }
                    add(measure("\(name) tuned step (last stage norms)", key: tuneKey, items: batch, unit: "img") {
                        var gradients = tuned.map { [Float](repeating: 0, count: $0.count) }
                        mci.tuningStep(pixels: p, batch: batch, tuned: tuned, lossGradient: { features in
                            var logits = [Float](repeating: 0, count: batch * classes), dlogits = logits, dFeatures = [Float](repeating: 0, count: batch * e)
                            linearForward(&logits, features, head, nil, n: batch, inFeatures: e, outFeatures: classes)
                            _ = crossEntropyForwardBackward(dlogits: &dlogits, logits, labels: labels, n: batch, c: classes, smoothing: 0.1)
                            linearBackward(dinp: &dFeatures, dweight: nil, dbias: nil, dlogits, features, head, n: batch, inFeatures: e, outFeatures: classes)
                            return dFeatures
                        }, gradients: &gradients)
                    })
                }
            }
        }
    }

    /// `--attention ab`: `body` with the per-head kernel and with the tiled one, one warm-up each, then
    /// `iterations` rounds of one run of each in turn (so load elsewhere falls on both alike); the median
    /// and the best round of each, and the breakdown's attention time per item of one profiled run each.
    func compareAttention(_ name: String, key: String, items: Int, unit: String, _ body: () -> Void) -> AttentionComparison {
        let kernels: [AttentionKernel] = [.perHeadGEMM, .tiled]
        func timed(_ kernel: AttentionKernel) -> Double {
            withAttentionKernel(kernel) {
                let start = DispatchTime.now().uptimeNanoseconds
                body()
                return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            }
        }
        for kernel in kernels { _ = timed(kernel) }
        var seconds: [[Double]] = [[], []]
        for round in 0..<iterations {
            // alternate which goes first, so neither always runs right after the other's cache state
            for i in (round % 2 == 0 ? [0, 1] : [1, 0]) { seconds[i].append(timed(kernels[i])) }
        }
        let attentionMs: [Double] = kernels.map { kernel in
            let profile = KernelProfile()
            withAttentionKernel(kernel) { profile.collect { body() } }
            let e = KernelPhase.allCases.reduce(0.0) { $0 + profile.entry(.attention, $1).threadSeconds }
            return e / Double(threads) / Double(items) * 1000
        }
        func median(_ x: [Double]) -> Double { let s = x.sorted(); return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2 }
        return AttentionComparison(name: name, key: key, unit: unit, rounds: iterations,
                                   medianMs: seconds.map { median($0) / Double(items) * 1000 },
                                   bestMs: seconds.map { $0.min()! / Double(items) * 1000 }, attentionMs: attentionMs)
    }

    /// Times `body` as a job runs it (one warm-up, `iterations` repetitions), then `iterations` more with a profile collecting.
    func measure(_ name: String, key: String, items: Int, unit: String, _ body: () -> Void) -> BenchFigure {
        body()
        let wall = DispatchTime.now().uptimeNanoseconds, cpu = processCPUSeconds()
        for _ in 0..<iterations { body() }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - wall) / 1e9 / Double(iterations)
        let cpuSeconds = (processCPUSeconds() - cpu) / Double(iterations)
        let profile = KernelProfile()
        let start = DispatchTime.now().uptimeNanoseconds
        profile.collect { for _ in 0..<iterations { body() } }
        let profiled = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 / Double(iterations)
        return BenchFigure(name: name, key: key, items: items, unit: unit, iterations: iterations, wall: seconds, cpu: cpuSeconds,
                           profiledWall: profiled, profile: profile)
    }
}

/// FLOP/s of `sgemm` (nolad's wrapper, the caller's threads) on one shape, β = 0, operands dense: the best
/// of 5 rounds of `seconds`/5 each (at least one call per round), so that a moment of load elsewhere on the
/// machine does not lower the reference rate.
func sgemmRate(_ s: GEMMShape, seconds: Double) -> Double {
    var rng = SplitMix64(seed: 7)
    let a = Buffer((0..<(s.m * s.k)).map { _ in Float.random(in: -1...1, using: &rng) })
    let b = Buffer((0..<(s.k * s.n)).map { _ in Float.random(in: -1...1, using: &rng) })
    let c = Buffer(count: s.m * s.n)
    func call() {
        sgemm(transA: s.transA, transB: s.transB, m: s.m, n: s.n, k: s.k, a: a.data, lda: s.transA ? s.m : s.k,
              b: b.data, ldb: s.transB ? s.k : s.n, c: c.data, ldc: s.n)
    }
    call()
    var best = 0.0
    for _ in 0..<5 {
        var calls = 0, elapsed = 0.0
        let start = DispatchTime.now().uptimeNanoseconds
        while calls < 1 || elapsed < seconds / 5 {
            call(); calls += 1
            elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        }
        best = max(best, Double(s.flops) * Double(calls) / elapsed)
    }
    withExtendedLifetime((a, b, c)) {}
    return best
}

/// A smooth synthetic photo (gradients and a few discs), deterministic in `seed`.
func syntheticImage(width: Int, height: Int, seed: UInt64) -> RGBImage {
    var rng = SplitMix64(seed: seed)
    let cx = Double.random(in: 0...Double(width), using: &rng), cy = Double.random(in: 0...Double(height), using: &rng)
    var pixels = [UInt8](repeating: 0, count: width * height * 3)
    for y in 0..<height {
        for x in 0..<width {
            let r = ((Double(x) - cx) * (Double(x) - cx) + (Double(y) - cy) * (Double(y) - cy)).squareRoot()
            let i = (y * width + x) * 3
            pixels[i] = UInt8(truncatingIfNeeded: x * 255 / max(width - 1, 1))
            pixels[i + 1] = UInt8(truncatingIfNeeded: y * 255 / max(height - 1, 1))
            pixels[i + 2] = r < 60 ? 230 : UInt8(truncatingIfNeeded: Int(r) & 0xff)
        }
    }
    return RGBImage(width: width, height: height, pixels: pixels)
}

/// One figure of `nolad bench`: its timing, and the profile of its profiled repetitions.
struct BenchFigure {
    let name: String, key: String
    let items: Int, unit: String, iterations: Int
    /// Seconds per repetition: wall-clock, process CPU time, wall-clock with the timers on.
    let wall: Double, cpu: Double, profiledWall: Double
    let profile: KernelProfile

    var timingLine: String {
        name.padding(toLength: 36, withPad: " ", startingAt: 0)
            + String(format: "%9.1f ms/%@  %8.1f %@/s   (CPU time %.1f ms/%@ over all threads)",
                     wall / Double(items) * 1000, unit, Double(items) / wall, unit, cpu / Double(items) * 1000, unit)
    }

    /// FLOPs of one repetition (every sgemm call: linear layers and attention).
    var flops: Double { Double(profile.totalFlops) / Double(iterations) }
    var gflops: Double { flops / wall / 1e9 }

    /// The sgemm rate this figure's GEMM FLOPs would reach at the measured rate of each of its linear-layer
    /// shapes (FLOP-weighted harmonic mean); nil when it ran no GEMM.
    func sgemmRate(_ rates: [GEMMShape: Double]) -> Double? {
        let shapes = profile.gemmShapes
        let total = shapes.reduce(0.0) { $0 + Double($1.flops) }
        guard total > 0 else { return nil }
        return total / shapes.reduce(0.0) { $0 + Double($1.flops) / rates[$1.shape]! }
    }

    /// Milliseconds per item of wall time: thread-seconds / threads / repetitions / items.
    func ms(_ threadSeconds: Double, threads: Int) -> Double {
        threadSeconds / Double(threads) / Double(iterations) / Double(items) * 1000
    }

    /// Breakdown rows: (label, key, forward ms, backward ms, GFLOP/s within the op or nil), and the attention parts.
    func rows(threads: Int) -> [(label: String, key: String, forward: Double, backward: Double, backwardCalls: Int, gflops: Double?)] {
        KernelOp.allCases.compactMap { op in
            let f = profile.entry(op, .forward), b = profile.entry(op, .backward)
            guard f.calls + b.calls > 0 else { return nil }
            let seconds = (f.threadSeconds + b.threadSeconds) / Double(threads)
            let flops = Double(f.flops + b.flops)
            return (op.label, op.key, ms(f.threadSeconds, threads: threads), ms(b.threadSeconds, threads: threads), b.calls,
                    flops > 0 && seconds > 0 ? flops / seconds / 1e9 : nil)
        }
    }

    var profiledMs: Double { profiledWall / Double(items) * 1000 }
    func accountedMs(threads: Int) -> Double { ms(profile.totalThreadSeconds, threads: threads) }

    func report(rates: [GEMMShape: Double], threads: Int) -> [String] {
        var lines: [String] = []
        let per = flops / Double(items)
        var head = per == 0 ? "\(name): no GEMM" : String(format: "%@: %.3f GFLOP/%@ counted (all GEMMs, attention's included), %.1f GFLOP/s", name, per / 1e9, unit, gflops)
        if let rate = sgemmRate(rates) {
            head += String(format: ", %.0f %% of the sgemm rate on its linear-layer shapes (%.1f GFLOP/s)", gflops * 1e9 / rate * 100, rate / 1e9)
        }
        lines.append(head)
        let backward = KernelOp.allCases.contains { profile.entry($0, .backward).calls > 0 }
        lines.append(String(format: "  breakdown in ms/%@ (thread time / %d threads; the timed run took %.2f ms/%@)", unit, threads, profiledMs, unit))
        lines.append("    " + "operation".padding(toLength: 44, withPad: " ", startingAt: 0) + "  forward" + (backward ? " backward" : "") + "   GFLOP/s")
        func row(_ label: String, _ f: Double, _ b: Double?, _ g: Double?) -> String {
            "    " + label.padding(toLength: 44, withPad: " ", startingAt: 0) + String(format: "%9.2f", f)
                + (backward ? (b.map { String(format: "%9.2f", $0) } ?? "         ") : "")
                + (g.map { String(format: "%10.1f", $0) } ?? "")
        }
        for r in rows(threads: threads) {
            lines.append(row(r.label, r.forward, r.backwardCalls > 0 ? r.backward : nil, r.gflops))
            if r.key == KernelOp.attention.key {
                for part in AttentionPart.allCases {
                    lines.append(row("  " + part.label, ms(profile.attentionPart(part, .forward), threads: threads),
                                     ms(profile.attentionPart(part, .backward), threads: threads), nil))
                }
                let pf = AttentionPart.allCases.reduce(0.0) { $0 + profile.attentionPart($1, .forward) }
                let pb = AttentionPart.allCases.reduce(0.0) { $0 + profile.attentionPart($1, .backward) }
                lines.append(row("  per-head loop: overhead, imbalance", r.forward - ms(pf, threads: threads), r.backward - ms(pb, threads: threads), nil))
            }
        }
        let accounted = accountedMs(threads: threads)
        lines.append(row(backward ? "sum, forward + backward" : "sum", accounted, nil, nil))
        lines.append("    " + "unaccounted (timed run − sum)".padding(toLength: 44, withPad: " ", startingAt: 0)
                     + String(format: "%9.2f  (%.1f %% of the timed run)", profiledMs - accounted, (profiledMs - accounted) / profiledMs * 100))
        return lines
    }

    func json(rates: [GEMMShape: Double], threads: Int) -> [String: Any] {
        var breakdown: [String: [String: Double]] = ["forward": [:], "backward": [:]]
        for r in rows(threads: threads) {
            breakdown["forward"]![r.key] = r.forward
            if r.backwardCalls > 0 { breakdown["backward"]![r.key] = r.backward }
        }
        var parts: [String: [String: Double]] = ["forward": [:], "backward": [:]]
        for part in AttentionPart.allCases {
            parts["forward"]![part.key] = ms(profile.attentionPart(part, .forward), threads: threads)
            parts["backward"]![part.key] = ms(profile.attentionPart(part, .backward), threads: threads)
        }
        var object: [String: Any] = [
            "name": name, "key": key, "items": items, "unit": unit,
            "ms_per_item": wall / Double(items) * 1000, "cpu_ms_per_item": cpu / Double(items) * 1000,
            "flops_per_item": flops / Double(items), "gflops": gflops,
            "profiled_ms_per_item": profiledMs, "breakdown_ms_per_item": breakdown, "attention_parts_ms_per_item": parts,
            "unaccounted_ms_per_item": profiledMs - accountedMs(threads: threads),
        ]
        if let rate = sgemmRate(rates) { object["sgemm_gflops"] = rate / 1e9; object["share_of_sgemm"] = gflops * 1e9 / rate }
        return object
    }
}

/// One figure of `nolad bench --attention ab`: index 0 the per-head kernel, 1 the tiled one.
struct AttentionComparison {
    let name: String, key: String, unit: String, rounds: Int
    let medianMs: [Double], bestMs: [Double], attentionMs: [Double]

    var line: String {
        "\(name): " + String(format: "per-head attention %.1f ms/", medianMs[0]) + unit
            + String(format: " (best %.1f; attention %.1f), tiled %.1f ms/", bestMs[0], attentionMs[0], medianMs[1]) + unit
            + String(format: " (best %.1f; attention %.1f): %+.1f %% (median of %d interleaved rounds)", bestMs[1], attentionMs[1],
                     (medianMs[1] / medianMs[0] - 1) * 100, rounds)
    }
    var json: [String: Any] {
        ["key": key, "rounds": rounds, "per_head_ms_per_item": medianMs[0], "tiled_ms_per_item": medianMs[1],
         "per_head_best_ms_per_item": bestMs[0], "tiled_best_ms_per_item": bestMs[1],
         "per_head_attention_ms_per_item": attentionMs[0], "tiled_attention_ms_per_item": attentionMs[1]]
    }
}
