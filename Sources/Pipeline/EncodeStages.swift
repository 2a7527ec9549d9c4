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
struct EncodeStage: NolaStage {
    let name = "encode"
    /// Images decoded and encoded per batch.
    static let batchSize = 8

    func run(_ described: Described, _ context: JobContext) throws -> Encoded {
        let start = Date()
        let validated = described.validated
        let inferenceOnly = validated.promptsFromJob != nil
        let imageSize = described.imageSize
        var dinoEntry: ModelCache.DINOEntry?
        if !inferenceOnly, let dinoFolder = validated.dinoFolder {
            let loaded = try ModelCache.shared.dino(dinoFolder)
            let d = loaded.model
            guard d.accepts(height: imageSize, width: imageSize) else {
                throw JobError.badInput("DINO model \(dinoFolder.path) takes images of \(d.inputSizeRule), but CLIP's weak view is \(imageSize)×\(imageSize)")
            }
            dinoEntry = loaded
        }
        let dino = dinoEntry
        let images = try context.withDatabase { try Results.images($0, jobID: context.jobID) }
        var unreadable: [String: String] = [:]
        let n = images.count
        let clipEntry = described.clip
        let clip = clipEntry.model
        let e = clip.projectionDim, dd = dino?.model.config.hiddenSize ?? 0
        let view = "weak-\(imageSize)-clip"
        let hashes = Array(Set(images.map(\.sha256)))
        func readCache() throws -> (clip: [String: [Float]], dino: [String: [Float]]) {
            var clipCache: [String: [Float]] = [:], dinoCache: [String: [Float]] = [:]
            for chunk in stride(from: 0, to: hashes.count, by: 1000).map({ Array(hashes[$0..<min(hashes.count, $0 + 1000)]) }) {
                clipCache.merge(try context.withDatabase { try PipelineTables.cachedFeatures($0, model: clipEntry.identity.key, view: view, sha256: chunk, dimension: e) }) { a, _ in a }
                if let dino {
                    dinoCache.merge(try context.withDatabase { try PipelineTables.cachedFeatures($0, model: dino.identity.key, view: view, sha256: chunk, dimension: dd) }) { a, _ in a }
                }
            }
            return (clipCache, dinoCache)
        }
        var (clipCache, dinoCache) = try readCache()
        func cached(_ i: Int) -> Bool {
            let sha = images[i].sha256
            return clipCache[sha] != nil && (dino == nil || dinoCache[sha] != nil)
        }
        let cachedCount = (0..<n).filter(cached).count
        try context.reportProgress(stage: name, done: cachedCount, total: n)

        // The images in shards that any worker may compute (docs/scale-out.md); this one works on them too.
        // A shard skips the images found in the feature cache and reports the unreadable ones.
        let sharded = try ShardComputation.runStage(
            context, stage: name, paths: images.map(\.path), clipFolder: validated.clipFolder,
            dinoFolder: dino == nil ? nil : validated.dinoFolder,
            modelKeys: [clipEntry.identity.key] + (dino.map { [$0.identity.key] } ?? []), blob: nil)
        for shard in sharded.results { unreadable.merge(shard.unreadable) { a, _ in a } }
        (clipCache, dinoCache) = try readCache()
        let computed = (0..<n).filter(cached).count - cachedCount
        for i in 0..<n where unreadable[images[i].path] == nil && !cached(i) {
            throw JobError.transient("the features of \(images[i].path) are missing from the feature cache after its shard was done")
        }

        let readable = (0..<n).filter { unreadable[images[$0].path] == nil }
        guard !readable.isEmpty else {
            throw JobError.badInput("none of the \(n) images of \(context.collection.path) could be decoded (first: \(unreadable.sorted { $0.key < $1.key }.first?.value ?? "?"))")
        }
        let encoded = Encoded(
            described: described, dino: dino, images: images, unreadable: unreadable, readable: readable,
            clipFeatures: readable.flatMap { clipCache[images[$0].sha256]! },
            dinoFeatures: dino != nil ? readable.flatMap { dinoCache[images[$0].sha256]! } : [],
            truth: folderLabels(relativePaths: readable.map { images[$0].path }, classes: context.classes))
        let elapsed = Date().timeIntervalSince(start)
        try context.recordEvent(stage: name, kind: "metrics", metrics: [
            "images": number(n), "readable": number(readable.count), "unreadable": number(unreadable.count),
            "from_cache": number(cachedCount), "encoded": number(computed),
            "images_per_second": number(computed > 0 ? Double(computed) / elapsed : 0),
            "seconds": seconds(since: start), "folder_labels": .bool(encoded.truth != nil),
            "shards": number(sharded.results.count), "shards_by_worker": .object(sharded.workers.mapValues { number($0) }),
        ])
        return encoded
    }
}

// MARK: stage 2

struct PseudoLabelJobStage: NolaStage {
    let name = "pseudolabel"

    func run(_ encoded: Encoded, _ context: JobContext) throws -> Taught {
        let start = Date()
        let clip = encoded.clip.model
        let classifier = encoded.described.classifier
        let e = clip.projectionDim, c = context.classes.count
        guard encoded.validated.promptsFromJob == nil, let dino = encoded.dino else {
            // Inference only: the zero-shot labels are still reported beside the tuned ones.
            let probabilities = try zeroShotProbabilities(imageFeatures: encoded.clipFeatures, classifier: classifier, dimension: e,
                                                         logitScale: exp(clip.logitScale))
            let (labels, confidences) = argmaxRows(probabilities, columns: c)
            var metrics: [String: JSONValue] = ["inference_only": true, "seconds": seconds(since: start)]
            if let truth = encoded.truth { metrics["accuracy_zero_shot"] = number(accuracy(predicted: labels, truth: truth)) }
            try context.recordEvent(stage: name, kind: "metrics", metrics: metrics)
            return Taught(encoded: encoded, zeroShotLabels: labels, zeroShotConfidences: confidences, stage2: nil)
        }
        let dd = dino.model.config.hiddenSize
        let epochs = encoded.parameters.alignmentEpochs
        var losses: [JSONValue] = []
        let stage: PseudoLabelStage
        do {
            stage = try runPseudoLabelStage(clipFeatures: encoded.clipFeatures, classifier: classifier, featureSize: e,
                                            logitScale: exp(clip.logitScale), dinoFeatures: encoded.dinoFeatures, dinoSize: dd,
                                            parameters: encoded.parameters) { epoch, loss in
                losses.append(number(loss))
                try context.reportProgress(stage: name, done: epoch + 1, total: max(1, epochs))
            }
        } catch let error as MethodError {
            throw JobError.badInput("\(error)")
        }
        var perClass: [String: JSONValue] = [:]
        for (k, name) in context.classes.enumerated() {
            perClass[name] = ["pseudo_labels": number(stage.pseudoLabels.countPerClass[k]), "rank_used": number(stage.pseudoLabels.rankUsed[k])]
        }
        var metrics: [String: JSONValue] = [
            "k": number(stage.k), "selected": number(stage.pseudoLabels.indices.count), "classes": .object(perClass),
            "alignment_loss": .array(losses), "seconds": seconds(since: start),
        ]
        if let truth = encoded.truth {
            metrics["accuracy_zero_shot"] = number(accuracy(predicted: stage.zeroShotLabels, truth: truth))
            if !stage.pseudoLabels.indices.isEmpty {
                metrics["accuracy_pseudo_labels"] = number(accuracy(predicted: stage.pseudoLabels.labels,
                                                                    truth: stage.pseudoLabels.indices.map { truth[$0] }))
            }
            metrics["accuracy_alignment_module"] = number(accuracy(predicted: stage.teacherLabels, truth: truth))
        }
        try context.recordEvent(stage: name, kind: "metrics", metrics: metrics)
        return Taught(encoded: encoded, zeroShotLabels: stage.zeroShotLabels, zeroShotConfidences: stage.zeroShotConfidences, stage2: stage)
    }
}
