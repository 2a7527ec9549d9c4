import Foundation
import Imaging
import Kernels
import Method
import Models
import Queue

// MARK: features of the weak views

/// CLIP `get_image_features` and DINO's CLS features of every image's weak view (CLIP's preprocessing
/// for both, as the NoLA reference does), from the feature cache where present. Unreadable images are
/// left out of the features and keep their reason for their label row.
struct EncodeStage: PipelineStage {
    let name = "encode"
    /// Images decoded and encoded per batch.
    static let batchSize = 8

    func body(_ context: JobContext) throws {
        let run = try NolaPipeline.runs.get(context)
        let start = Date()
        let inferenceOnly = run.promptsFromJob != nil
        if !inferenceOnly, let dinoFolder = run.dinoFolder {
            run.dino = try ModelCache.shared.dino(dinoFolder)
            let d = run.dino!.model
            guard d.accepts(height: run.imageSize, width: run.imageSize) else {
                throw JobError.badInput("DINO model \(dinoFolder.path) takes images of \(d.inputSizeRule), but CLIP's weak view is \(run.imageSize)×\(run.imageSize)")
            }
        }
        run.images = try context.withDatabase { try Results.images($0, jobID: context.jobID) }
        let n = run.images.count
        let clip = run.clip.model
        let e = clip.projectionDim, dd = run.dino?.model.config.hiddenSize ?? 0
        let view = "weak-\(run.imageSize)-clip"
        let hashes = Array(Set(run.images.map(\.sha256)))
        func readCache() throws -> (clip: [String: [Float]], dino: [String: [Float]]) {
            var clipCache: [String: [Float]] = [:], dinoCache: [String: [Float]] = [:]
            for chunk in stride(from: 0, to: hashes.count, by: 1000).map({ Array(hashes[$0..<min(hashes.count, $0 + 1000)]) }) {
                clipCache.merge(try context.withDatabase { try PipelineTables.cachedFeatures($0, model: run.clip.identity.key, view: view, sha256: chunk, dimension: e) }) { a, _ in a }
                if let dino = run.dino {
                    dinoCache.merge(try context.withDatabase { try PipelineTables.cachedFeatures($0, model: dino.identity.key, view: view, sha256: chunk, dimension: dd) }) { a, _ in a }
                }
            }
            return (clipCache, dinoCache)
        }
        var (clipCache, dinoCache) = try readCache()
        func cached(_ i: Int) -> Bool {
            let sha = run.images[i].sha256
            return clipCache[sha] != nil && (run.dino == nil || dinoCache[sha] != nil)
        }
        let cachedCount = (0..<n).filter(cached).count
        try context.reportProgress(stage: name, done: cachedCount, total: n)

        // The images in shards that any worker may compute (docs/scale-out.md); this one works on them too.
        // A shard skips the images found in the feature cache and reports the unreadable ones.
        let sharded = try ShardComputation.runStage(
            context, stage: name, paths: run.images.map(\.path), clipFolder: run.clipFolder,
            dinoFolder: run.dino == nil ? nil : run.dinoFolder,
            modelKeys: [run.clip.identity.key] + (run.dino.map { [$0.identity.key] } ?? []), blob: nil)
        for shard in sharded.results { run.unreadable.merge(shard.unreadable) { a, _ in a } }
        (clipCache, dinoCache) = try readCache()
        let computed = (0..<n).filter { cached($0) }.count - cachedCount
        for i in 0..<n where run.unreadable[run.images[i].path] == nil && !cached(i) {
            throw JobError.transient("the features of \(run.images[i].path) are missing from the feature cache after its shard was done")
        }

        run.readable = (0..<n).filter { run.unreadable[run.images[$0].path] == nil }
        guard !run.readable.isEmpty else {
            throw JobError.badInput("none of the \(n) images of \(context.collection.path) could be decoded (first: \(run.unreadable.sorted { $0.key < $1.key }.first?.value ?? "?"))")
        }
        run.clipFeatures = run.readable.flatMap { clipCache[run.images[$0].sha256]! }
        if run.dino != nil { run.dinoFeatures = run.readable.flatMap { dinoCache[run.images[$0].sha256]! } }
        run.truth = folderLabels(relativePaths: run.readable.map { run.images[$0].path }, classes: context.classes)
        let elapsed = Date().timeIntervalSince(start)
        try context.recordEvent(stage: name, kind: "metrics", metrics: [
            "images": number(n), "readable": number(run.readable.count), "unreadable": number(run.unreadable.count),
            "from_cache": number(cachedCount), "encoded": number(computed),
            "images_per_second": number(computed > 0 ? Double(computed) / elapsed : 0),
            "seconds": seconds(since: start), "folder_labels": .bool(run.truth != nil),
            "shards": number(sharded.results.count), "shards_by_worker": .object(sharded.workers.mapValues { number($0) }),
        ])
    }
}

// MARK: stage 2

struct PseudoLabelJobStage: PipelineStage {
    let name = "pseudolabel"

    func body(_ context: JobContext) throws {
        let run = try NolaPipeline.runs.get(context)
        let start = Date()
        let clip = run.clip.model
        let e = clip.projectionDim, c = context.classes.count
        if run.promptsFromJob != nil {
            // Inference only: the zero-shot labels are still reported beside the tuned ones.
            let probabilities = try zeroShotProbabilities(imageFeatures: run.clipFeatures, classifier: run.classifier, dimension: e,
                                                         logitScale: exp(clip.logitScale))
            (run.zeroShotLabels, run.zeroShotConfidences) = argmaxRows(probabilities, columns: c)
            var metrics: [String: JSONValue] = ["inference_only": true, "seconds": seconds(since: start)]
            if let truth = run.truth { metrics["accuracy_zero_shot"] = number(accuracy(predicted: run.zeroShotLabels, truth: truth)) }
            try context.recordEvent(stage: name, kind: "metrics", metrics: metrics)
            return
        }
        let dd = run.dino!.model.config.hiddenSize
        let epochs = run.parameters.alignmentEpochs
        var losses: [JSONValue] = []
        let stage: PseudoLabelStage
        do {
            stage = try runPseudoLabelStage(clipFeatures: run.clipFeatures, classifier: run.classifier, featureSize: e,
                                            logitScale: exp(clip.logitScale), dinoFeatures: run.dinoFeatures, dinoSize: dd,
                                            parameters: run.parameters) { epoch, loss in
                losses.append(number(loss))
                try context.reportProgress(stage: name, done: epoch + 1, total: max(1, epochs))
            }
        } catch let error as MethodError {
            throw JobError.badInput("\(error)")
        }
        run.stage2 = stage
        run.zeroShotLabels = stage.zeroShotLabels
        run.zeroShotConfidences = stage.zeroShotConfidences
        var perClass: [String: JSONValue] = [:]
        for (k, name) in context.classes.enumerated() {
            perClass[name] = ["pseudo_labels": number(stage.pseudoLabels.countPerClass[k]), "rank_used": number(stage.pseudoLabels.rankUsed[k])]
        }
        var metrics: [String: JSONValue] = [
            "k": number(stage.k), "selected": number(stage.pseudoLabels.indices.count), "classes": .object(perClass),
            "alignment_loss": .array(losses), "seconds": seconds(since: start),
        ]
        if let truth = run.truth {
            metrics["accuracy_zero_shot"] = number(accuracy(predicted: stage.zeroShotLabels, truth: truth))
            if !stage.pseudoLabels.indices.isEmpty {
                metrics["accuracy_pseudo_labels"] = number(accuracy(predicted: stage.pseudoLabels.labels,
                                                                    truth: stage.pseudoLabels.indices.map { truth[$0] }))
            }
            metrics["accuracy_alignment_module"] = number(accuracy(predicted: stage.teacherLabels, truth: truth))
        }
        try context.recordEvent(stage: name, kind: "metrics", metrics: metrics)
    }
}
