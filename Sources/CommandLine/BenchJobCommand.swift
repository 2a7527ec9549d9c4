import ArgumentParser
import Daemon
import Foundation
import Imaging
import Kernels
import Method
import Models
import Pipeline

/// A whole NoLA job without the database: full-size CLIP ViT-B/32 and DINO ViT-B/16 with random
/// weights, N synthetic images, C classes, E prompt-tuning epochs. Compare with
/// `reference/bench_job_torch.py` run with the same --images, --classes, --epochs, --batch and --threads.
struct BenchJob: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-job",
        abstract: "Time a whole NoLA job (stages 1–4) at full model size with random weights, without the database.")

    @Option(help: "Images (N).") var images = 64
    @Option(help: "Classes (C).") var classes = 10
    @Option(help: "Prompt-tuning epochs (E).") var epochs = 1
    @Option(help: "Prompt-tuning logical batch (the reference's is 512).") var batch = 32
    @Option(help: "Prompt-tuning micro-batch.") var microBatch = 32
    @Option(help: "Threads for the numeric kernels (GEMMs included).") var threads = 2
    @Option(help: "Sentences per class (tokens each: 20).") var sentences = 9

    /// The same synthetic image the PyTorch script draws: 320×240, value (7x + 13y + 29c + 31i) mod 256.
    static func syntheticImage(_ i: Int) -> RGBImage {
        let w = 320, h = 240
        var pixels = [UInt8](repeating: 0, count: w * h * 3)
        for y in 0..<h { for x in 0..<w { for c in 0..<3 { pixels[(y * w + x) * 3 + c] = UInt8((7 * x + 13 * y + 29 * c + 31 * i) % 256) } } }
        return RGBImage(width: w, height: h, pixels: pixels)
    }

    /// Every kernel of the command runs with `--threads` threads (docs/threading.md).
    func run() throws { try withThreads(threads) { try runWithThreads() } }

    func runWithThreads() throws {
        let clip = try CLIPModel(config: CLIPConfig(), weights: nil)
        let dino = try ViTModel(kind: .vit, config: ViTConfig(), weights: nil)
        let rgb = (0..<images).map(Self.syntheticImage)
        var parameters = NolaParameters()
        parameters.promptEpochs = epochs
        parameters.promptBatchSize = batch
        parameters.promptMicroBatchSize = microBatch
        print("nolad bench-job: N \(images), C \(classes), E \(epochs), batch \(batch) (micro \(microBatch)), threads \(threads), random full-size CLIP ViT-B/32 + DINO ViT-B/16")
        var timings: [(String, Double)] = []
        func timed<T>(_ name: String, _ body: () throws -> T) rethrows -> T {
            let start = DispatchTime.now().uptimeNanoseconds
            let value = try body()
            timings.append((name, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9))
            return value
        }
        let total = DispatchTime.now().uptimeNanoseconds
        // Stage 1: C × sentences texts of 20 tokens.
        var rng = SplitMix64(seed: 1)
        let classifier = try timed("1 text encoder + classifier") { () throws -> [Float] in
            let embeddings = (0..<classes).map { _ in
                clip.getTextFeatures((0..<sentences).map { _ in [49406] + (0..<18).map { _ in Int32.random(in: 1..<49406, using: &rng) } + [49407] })
            }
            return try buildClassifier(embeddings: embeddings, dimension: clip.projectionDim)
        }
        // Weak views, CLIP and DINO features, batches of 16.
        let (clipFeatures, dinoFeatures) = timed("2a weak views + CLIP + DINO features") { () -> ([Float], [Float]) in
            var cf: [Float] = [], df: [Float] = []
            for from in stride(from: 0, to: images, by: 16) {
                let chunk = Array(from..<min(images, from + 16))
                let pixels = chunk.flatMap { weakView(rgb[$0]) }
                cf += clip.getImageFeatures(pixels: pixels, batch: chunk.count)
                df += pixels.withUnsafeBufferPointer { dino.clsFeatures(pixels: $0.baseAddress!, batch: chunk.count, height: 224, width: 224) }
            }
            return (cf, df)
        }
        let stage2 = try timed("2b zero-shot, pseudo-labels, alignment module") {
            try runPseudoLabelStage(clipFeatures: clipFeatures, classifier: classifier, featureSize: clip.projectionDim,
                                    logitScale: exp(clip.logitScale), dinoFeatures: dinoFeatures, dinoSize: dino.config.hiddenSize,
                                    parameters: parameters)
        }
        let encoder = CLIPPromptEncoder(model: clip, promptCount: parameters.promptCount)
        var state = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: parameters.promptCount, seed: parameters.seed)
        // The strong views as a job's owner computes them: the next unit's ahead on an idle-priority thread.
        let views = StrongViewSource(decoded: DecodedImages(images: rgb, threads: threads), seed: parameters.seed,
                                     config: StrongViewConfig(), mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd)
        defer { views.close() }
        try timed("3 prompt tuning (strong views + fwd/bwd)") {
            try runPromptTuning(encoder: encoder, state: &state, teacherLabels: stage2.teacherLabels, parameters: parameters,
                                strongViews: { try views.views($0, epoch: $1) },
                                viewsAhead: { views.ahead($0, epoch: $1) })
        }
        let labels = try timed("4 labels (prompted CLIP on weak views)") { () throws -> [Int] in
            var features: [Float] = []
            for from in stride(from: 0, to: images, by: 16) {
                let chunk = Array(from..<min(images, from + 16))
                features += try encoder.features(pixels: chunk.flatMap { weakView(rgb[$0]) }, batch: chunk.count,
                                                 prompts: state.prompts.values, layerNorms: state.layerNorms)
            }
            return labelImages(features: features, head: state.head.values, classCount: classes).labels
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - total) / 1e9
        for (name, s) in timings { print(name.padding(toLength: 46, withPad: " ", startingAt: 0) + String(format: "%8.1f s", s)) }
        print(String(format: "total %.1f s (%d labels, %d prompt-tuning steps); CPU time %.1f s; peak memory %.0f MB",
                     seconds, labels.count, state.step, processCPUSeconds(), peakResidentMegabytes()))
        print("strong views computed ahead (idle-priority thread): \(views.viewsAhead) of \(views.viewsAsked)")
    }
}
