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
        var clipCache: [String: [Float]] = [:], dinoCache: [String: [Float]] = [:]
        for chunk in stride(from: 0, to: hashes.count, by: 1000).map({ Array(hashes[$0..<min(hashes.count, $0 + 1000)]) }) {
            clipCache.merge(try context.withDatabase { try PipelineTables.cachedFeatures($0, model: clipEntry.identity.key, view: view, sha256: chunk, dimension: e) }) { a, _ in a }
            if let dino {
                dinoCache.merge(try context.withDatabase { try PipelineTables.cachedFeatures($0, model: dino.identity.key, view: view, sha256: chunk, dimension: dd) }) { a, _ in a }
            }
        }
        func cached(_ i: Int) -> Bool {
            let sha = images[i].sha256
            return clipCache[sha] != nil && (dino == nil || dinoCache[sha] != nil)
        }
        let missing = (0..<n).filter { !cached($0) }
        let cachedCount = n - missing.count
        try context.reportProgress(stage: name, done: cachedCount, total: n)

        // Decode the next batch on another thread while this one is encoded.
        let batches = stride(from: 0, to: missing.count, by: Self.batchSize).map { Array(missing[$0..<min(missing.count, $0 + Self.batchSize)]) }
        let threads = context.threads
        let config = described.weakConfig
        func decode(_ batch: [Int]) -> (tensor: [Float], errors: [Int: ImageError]) {
            weakViewBatch(batch.map { Encoded.file(context, images[$0]) }, config: config, threads: threads)
        }
        var done = cachedCount
        var computed = 0
        let prefetch = DispatchQueue(label: "nolad.encode.decode")
        var pending: DispatchWorkItem?
        var next: (tensor: [Float], errors: [Int: ImageError])?
        let slot = 3 * imageSize * imageSize
        for (b, batch) in batches.enumerated() {
            try context.checkCancelled()
            let decoded: (tensor: [Float], errors: [Int: ImageError])
            if let pending { pending.wait(); decoded = next! } else { decoded = decode(batch) }
            pending = nil
            if b + 1 < batches.count {
                let following = batches[b + 1]
                let item = DispatchWorkItem { next = decode(following) }
                pending = item
                prefetch.async(execute: item)
            }
            var ok: [Int] = []
            var pixels: [Float] = []
            for (j, i) in batch.enumerated() {
                if let error = decoded.errors[j] {
                    unreadable[images[i].path] = "\(error)"
                } else {
                    ok.append(i)
                    pixels += decoded.tensor[(j * slot)..<((j + 1) * slot)]
                }
            }
            if !ok.isEmpty {
                let cf = clip.getImageFeatures(pixels: pixels, batch: ok.count)
                var rows: [(sha256: String, values: [Float])] = []
                for (j, i) in ok.enumerated() {
                    let values = Array(cf[(j * e)..<((j + 1) * e)])
                    clipCache[images[i].sha256] = values
                    rows.append((images[i].sha256, values))
                }
                let clipRows = rows
                try context.withDatabase { try PipelineTables.cacheFeatures($0, model: clipEntry.identity.key, view: view, dimension: e, clipRows) }
                if let dino {
                    let df = pixels.withUnsafeBufferPointer {
                        dino.model.clsFeatures(pixels: $0.baseAddress!, batch: ok.count, height: imageSize, width: imageSize)
                    }
                    var dinoRows: [(sha256: String, values: [Float])] = []
                    for (j, i) in ok.enumerated() {
                        let values = Array(df[(j * dd)..<((j + 1) * dd)])
                        dinoCache[images[i].sha256] = values
                        dinoRows.append((images[i].sha256, values))
                    }
                    let rowsToWrite = dinoRows
                    try context.withDatabase { try PipelineTables.cacheFeatures($0, model: dino.identity.key, view: view, dimension: dd, rowsToWrite) }
                }
                computed += ok.count
            }
            done += batch.count
            try context.reportProgress(stage: name, done: done, total: n)
        }
        pending?.wait()

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
